"""The tiny RoBERTa, the generated data and the Trainer settings that tests/integration/test_transformers.py
and tests/integration/test_accelerate.py train with; as a script (under torchrun), FlatTrainer runs on
several CPU ranks for tests/integration/test_transformers.py.

Nothing is downloaded: the model is built from a config (2 layers, width 32, 3 labels) and the
data are random token ids with random labels (a fixed generator per example).

As a script: ``transformers_runner.py OUT_DIR KIND [KIND...]`` runs, one after the other in
the same process group, a FlatTrainer per KIND nso, sam, wsam, or an Accelerate loop with NSO
(KIND accelerate: prepared by flatfused.integrations.accelerate.prepare; accelerate_unlinked:
by prepare_optimizer and accelerator.prepare, without setting the optimizer's model), counting
DDP gradient synchronisations (comm-hook buckets that are the last of their backward pass)
and forward calls (open_clip_runner.counting_syncs), and writes ``OUT_DIR/KIND.RANK`` (JSON)
with the counts, whether the ranks' weights agree, and the logged losses (or the error).
"""
from __future__ import annotations

import json
import os
import sys

import torch

VOCAB, LENGTH, LABELS, BATCH = 100, 16, 3, 4


def tiny_model(dropout: bool = False, seed: int = 0):
    """RobertaForSequenceClassification, 2 layers of width 32, initialised from ``seed``;
    without ``dropout`` every pass at the same weights computes the same gradient."""
    from transformers import RobertaConfig, RobertaForSequenceClassification

    p = 0.1 if dropout else 0.0
    config = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2,
                           num_attention_heads=2, intermediate_size=64,
                           max_position_embeddings=LENGTH + 4, num_labels=LABELS,
                           hidden_dropout_prob=p, attention_probs_dropout_prob=p)
    torch.manual_seed(seed)
    return RobertaForSequenceClassification(config)


class TinyData(torch.utils.data.Dataset):
    """``n`` examples of random token ids (ids 3.. leave RoBERTa's special ones alone), a
    random attention-mask length and a random label."""

    def __init__(self, n: int = 32, seed: int = 1):
        g = torch.Generator().manual_seed(seed)
        self.ids = torch.randint(3, VOCAB, (n, LENGTH), generator=g)
        self.lengths = torch.randint(LENGTH // 2, LENGTH + 1, (n,), generator=g)
        self.labels = torch.randint(0, LABELS, (n,), generator=g)

    def __len__(self):
        return len(self.ids)

    def __getitem__(self, i):
        mask = (torch.arange(LENGTH) < self.lengths[i]).long()
        return {"input_ids": self.ids[i], "attention_mask": mask, "labels": self.labels[i]}


def quiet():
    """No progress bars or info logs from transformers/accelerate/datasets in the tests."""
    import logging

    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    for name in ("accelerate", "transformers"):
        logging.getLogger(name).setLevel(logging.ERROR)


def launch(out: str, kinds, timeout: float = 300):
    """Run this script under torchrun on 2 CPU ranks for ``kinds``: (return code, stdout,
    stderr), stdout and stderr ending with "timed out" when it ran past ``timeout``."""
    from launch import run_torchrun

    return run_torchrun(["--nproc_per_node", "2",
                         "--master_port", str(29600 + (os.getpid() + len(kinds)) % 1000),
                         os.path.abspath(__file__), str(out), *kinds], out, timeout)


def main(argv):
    import torch.distributed as dist

    from open_clip_runner import counting_syncs

    from transformers import PrinterCallback

    from flatfused.integrations.transformers import FlatTrainer, FlatTrainingArguments

    torch.set_num_threads(1)
    quiet()
    out, kinds = argv[0], argv[1:]
    radius = {"nso": {"nso_sigma": 0.01}, "sam": {"sam_rho": 0.05},
              "wsam": {"sam_rho": 0.05, "wsam_gamma": 0.8}}
    for kind in kinds:
        counts = {"syncs": 0, "buckets": 0, "forwards": 0}
        if kind.startswith("accelerate"):
            with counting_syncs(counts):
                model, found = accelerate_loop(linked=kind == "accelerate")
            write(out, kind, model, dict(counts, **found))
            continue
        args = FlatTrainingArguments(
            output_dir=os.path.join(out, kind), per_device_train_batch_size=BATCH,
            gradient_accumulation_steps=2, max_steps=2, learning_rate=1e-3, warmup_steps=1,
            max_grad_norm=1.0, logging_steps=1, save_strategy="no", report_to=[],
            disable_tqdm=True, use_cpu=True, ddp_backend="gloo", seed=0, flat_optimizer=kind,
            **radius[kind])
        model = tiny_model()
        with counting_syncs(counts):
            trainer = FlatTrainer(model=model, args=args, train_dataset=TinyData(32))
            trainer.remove_callback(PrinterCallback)  # (disable_tqdm's stand-in prints logs)
            trainer.train()
        counts["losses"] = [h["loss"] for h in trainer.state.log_history if "loss" in h]
        counts["sync_model"] = type(trainer.optimizer.optimizer.model).__name__
        write(out, kind, model, counts)
    dist.destroy_process_group()


def accelerate_loop(linked: bool):
    """2 NSO steps of 2 micro-batches per rank under accelerator.accumulate: (model, counts)."""
    import flatfused
    from accelerate import Accelerator
    from flatfused.integrations import accelerate as flat_accelerate

    acc = Accelerator(cpu=True, gradient_accumulation_steps=2)
    model = tiny_model()
    loader = torch.utils.data.DataLoader(TinyData(32), batch_size=BATCH)  # 16 per rank
    opt = flatfused.NSO(model, torch.optim.AdamW, sigma=0.01, lr=1e-3, max_grad_norm=1.0,
                        seed=0)
    if linked:
        model, opt, loader = flat_accelerate.prepare(acc, model, opt, loader)
    else:
        opt = flat_accelerate.prepare_optimizer(acc, opt)
        model, opt, loader = acc.prepare(model, opt, loader)
    losses, error = [], None
    try:
        for batch in loader:
            with acc.accumulate(model):
                def closure(batch=batch):
                    loss = model(**batch).loss
                    acc.backward(loss)
                    return loss
                loss = opt.step(closure)
                if loss is not None:
                    losses.append(float(acc.reduce(loss, "mean")))
                opt.zero_grad()
    except flat_accelerate.FlatStepError as e:
        error = str(e)
    return acc.unwrap_model(model), {"losses": losses, "error": error,
                                     "sync_model": type(opt.optimizer.model).__name__}


def write(out: str, kind: str, model, counts: dict) -> None:
    """Record the counts, and whether the ranks' weights agree, in OUT/KIND.RANK."""
    import torch.distributed as dist

    weights = torch.cat([p.detach().reshape(-1) for p in model.parameters()])
    gathered = [torch.empty_like(weights) for _ in range(dist.get_world_size())]
    dist.all_gather(gathered, weights)
    counts["replicas_equal"] = all(torch.equal(gathered[0], w) for w in gathered)
    counts["finite"] = bool(torch.isfinite(weights).all())
    counts["world_size"] = dist.get_world_size()
    with open(os.path.join(out, f"{kind}.{dist.get_rank()}"), "w") as f:
        json.dump(counts, f)


if __name__ == "__main__":
    main(sys.argv[1:])
    from flatfused.distributed import exit_without_teardown

    exit_without_teardown()  # done (a failure raised above)
