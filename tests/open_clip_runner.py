"""Runs open_clip_train (plain, or under flatfused's launcher) for tests/integration/test_open_clip.py.

open_clip's synthetic dataset yields one black image and one caption for every sample, which
makes every contrastive gradient zero. :func:`varied_synthetic_data` keeps the dataset, its
loader and open_clip's transforms but gives each index its own random image and caption, and
reseeds torch at each epoch's ``set_epoch`` so that the shuffle and the crops of an epoch are
the same in an uninterrupted run and in one resumed from a checkpoint.

As a script (under torchrun): ``open_clip_runner.py [--sync-log FILE] {plain,flat} ARGS...``
(several runs joined by ``--then``, in one process group);
``--sync-log`` counts DDP gradient synchronisations (comm-hook buckets that are the last of
their backward pass) and forward calls, and checks that the ranks' weights agree.
"""
from __future__ import annotations

import contextlib
import json
import logging
import os
import sys

import torch

CONFIGS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "open_clip_configs")
WORDS = ["red", "green", "blue", "small", "large", "cat", "dog", "car", "tree", "house"]


def _item(self, idx):
    from PIL import Image

    g = torch.Generator().manual_seed(int(idx))
    width, height = self.image.size
    pixels = torch.randint(0, 256, (height, width, 3), generator=g, dtype=torch.uint8)
    caption = " ".join(WORDS[int(k)] for k in torch.randint(0, len(WORDS), (3,), generator=g))
    return self.transform(Image.fromarray(pixels.numpy())), self.preprocess_txt(caption)


@contextlib.contextmanager
def varied_synthetic_data():
    from open_clip_train import data

    original_item, original_set_epoch = data.SyntheticDataset.__getitem__, data.DataInfo.set_epoch

    def set_epoch(self, epoch):
        torch.manual_seed(10_000 + epoch)
        original_set_epoch(self, epoch)

    data.SyntheticDataset.__getitem__, data.DataInfo.set_epoch = _item, set_epoch
    try:
        yield
    finally:
        data.SyntheticDataset.__getitem__, data.DataInfo.set_epoch = original_item, original_set_epoch


def run(mode, argv):
    """``mode`` "plain": open_clip_train's main; "flat": the launcher. Returns the launcher's
    run object (or None)."""
    import open_clip

    open_clip.add_model_config(CONFIGS)
    with varied_synthetic_data():
        if mode == "plain":
            from open_clip_train.main import main
            assert main(list(argv)) != -1
            return None
        from flatfused.integrations import open_clip as launcher
        launched = launcher.run(list(argv))
        assert launched.result != -1
        return launched


@contextlib.contextmanager
def counting_syncs(counts):
    """Register, on every DDP module built meanwhile, a comm hook (all-reduce, then the mean, as
    DDP's default) that counts synchronised backward passes, and count forward calls."""
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    def hook(state, bucket):
        if bucket.is_last():
            counts["syncs"] += 1
        counts["buckets"] += 1
        fut = dist.all_reduce(bucket.buffer(), async_op=True).get_future()
        return fut.then(lambda f: f.value()[0].div_(dist.get_world_size()))

    def count_forward(module, args):
        counts["forwards"] += 1

    original_init = DDP.__init__

    def init(self, *args, **kwargs):
        original_init(self, *args, **kwargs)
        self.register_comm_hook(None, hook)
        self.register_forward_pre_hook(count_forward)

    DDP.__init__ = init
    try:
        yield
    finally:
        DDP.__init__ = original_init


def main(argv):
    """``[--sync-log FILE] MODE ARGS... [--then [--sync-log FILE] MODE ARGS...]...``: runs one
    after the other in the same processes."""
    import torch.distributed as dist

    torch.set_num_threads(1)
    runs = [[]]
    for token in argv:
        if token == "--then":
            runs.append([])
        else:
            runs[-1].append(token)
    if len(runs) > 1:
        # One process group for all the runs: open_clip initialises it in each, and a second
        # group over torchrun's store does not connect reliably.
        init = dist.init_process_group
        dist.init_process_group = lambda *a, **k: None if dist.is_initialized() else init(*a, **k)
    for one in runs:
        run_one(one)
    if dist.is_initialized():
        dist.destroy_process_group()


def run_one(argv):
    import torch.distributed as dist

    sync_log = None
    if argv[0] == "--sync-log":
        sync_log, argv = argv[1], argv[2:]
    mode, argv = argv[0], argv[1:]
    counts = {"syncs": 0, "buckets": 0, "forwards": 0}
    handlers = list(logging.root.handlers)
    with counting_syncs(counts) if sync_log else contextlib.nullcontext():
        launched = run(mode, argv)
    for handler in logging.root.handlers[:]:  # open_clip adds its log file's handler per run
        if handler not in handlers:
            logging.root.removeHandler(handler)
            handler.close()
    if sync_log:
        model = launched.optimizer.model if launched is not None else None
        weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
        gathered = [torch.empty_like(weights) for _ in range(dist.get_world_size())]
        dist.all_gather(gathered, weights)
        counts["replicas_equal"] = all(torch.equal(gathered[0], w) for w in gathered)
        counts["finite"] = bool(torch.isfinite(weights).all())
        counts["rank"] = dist.get_rank()
        with open(f"{sync_log}.{dist.get_rank()}", "w") as f:
            json.dump(counts, f)


if __name__ == "__main__":
    main(sys.argv[1:])
    from flatfused.distributed import exit_without_teardown

    exit_without_teardown()  # done (a failure raised above)
