"""Time and peak memory of one open_clip (CLIP) training step: AdamW, NSO through flatfused as
the open_clip launcher runs it, and NSO the reference's way.

    python -m flatfused.integrations.open_clip_bench --models tiny,ViT-B-32 --batch 4 --repeats 3

Contenders (AdamW lr 1e-3 over open_clip's two weight-decay groups, wd 0.1 on matrices):

- ``adamw``: open_clip's plain step, one forward-backward and ``AdamW.step()``;
- ``nso flatfused``: ``flatfused.NSO(None, adamw, sigma=0.008, lam=0, K=1, use_neg)``, one
  ``optimizer.step(closure)`` with the launcher's closure (:func:`open_clip_loop.make_closure`):
  two forward-backward passes, one gradient synchronisation under DDP;
- ``nso reference``: the NSO reference's trainer loop (``flatfused.reference.NSM`` and
  ``train_step``), three forward-backward passes (the clean one runs although ``lam == 0``),
  each of which would all-reduce under DDP.

Every contender starts from the same weights and batch (random images, random token ids); all
are built and warmed up (one step: lazy optimizer state), then timed round-robin, ``repeats``
steps each (median and minimum). Memory, with :class:`flatfused.benchmark.PeakMemory` (CUDA
allocator statistics; on CPU glibc's allocated-byte count, sampled every 0.1 ms): the state,
bytes still allocated after the warm-up step beyond what was before the optimizer was built
(gradients, optimizer state, the wrapper's copies), plus the step's transient peak above that
(activations, temporaries); their sum is the step's peak beyond the weights.
"""
from __future__ import annotations

import contextlib
import gc
import importlib
import json
import statistics
import sys
import time

import torch

import flatfused
from flatfused import backends as _backends
from flatfused import reference
from flatfused._argtypes import Parser, comma_list, output_path, positive, runnable_device
from flatfused.benchmark import PeakMemory
from flatfused.integrations.open_clip_loop import make_closure

CONTENDERS = ["adamw", "nso flatfused", "nso reference"]
SIGMA, LR, WD = 0.008, 1e-3, 0.1
# The tests' tiny CLIP (tests/open_clip_configs/flatfused-tiny.json).
TINY = {"embed_dim": 16,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16,
                       "patch_size": 16},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2,
                     "layers": 1}}


def model_config(name: str) -> dict:
    if name == "tiny":
        return TINY
    import open_clip

    config = open_clip.get_model_config(name)
    if config is None:
        raise ValueError(f"unknown open_clip model {name!r}")
    return config


def build_model(config: dict, device) -> torch.nn.Module:
    import open_clip

    return open_clip.CLIP(**config, output_dict=True).to(device)


def make_batch(config: dict, batch: int, device):
    g = torch.Generator().manual_seed(0)
    size = config["vision_cfg"]["image_size"]
    text = config["text_cfg"]
    images = torch.randn(batch, 3, size, size, generator=g)
    texts = torch.randint(1, text["vocab_size"], (batch, text["context_length"]), generator=g)
    return images.to(device), texts.to(device)


def param_groups(model):
    """open_clip's AdamW groups: no weight decay on gains, biases and the logit scale."""
    def exclude(n, p):
        return p.ndim < 2 or "bn" in n or "ln" in n or "bias" in n or "logit_scale" in n

    named = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    return [{"params": [p for n, p in named if exclude(n, p)], "weight_decay": 0.0},
            {"params": [p for n, p in named if not exclude(n, p)], "weight_decay": WD}]


def contender_step(contender: str, model, batch, loss, backend: str = "auto"):
    """(optimizer, one training step) for ``contender``."""
    images, texts = batch

    def loss_of(m, b):
        return sum(loss(**m(*b), output_dict=True).values())

    if contender == "adamw":
        opt = torch.optim.AdamW(param_groups(model), lr=LR)

        def step():
            opt.zero_grad()
            loss_of(model, batch).backward()
            opt.step()
        return opt, step
    if contender == "nso flatfused":
        opt = flatfused.NSO(None, torch.optim.AdamW(param_groups(model), lr=LR), sigma=SIGMA,
                            num_perturbs=1, lam=0.0, use_neg=True, model=model, seed=0,
                            backend=backend)

        def step():
            passes = []
            opt.step(make_closure(model, [batch], loss, contextlib.nullcontext, None, passes))
        return opt, step
    if contender == "nso reference":
        opt = reference.NSM(param_groups(model), torch.optim.AdamW, sigma=SIGMA, lr=LR)

        def step():
            reference.train_step(model, opt, loss_of, batch, num_perturbs=1, lam=0.0,
                                 use_neg=True)
        return opt, step
    raise ValueError(f"unknown contender {contender!r}; expected one of {CONTENDERS}")


def _live_bytes(device) -> int | None:
    return PeakMemory(device).start  # allocated bytes now (see PeakMemory)


def measure(name: str, batch_size: int = 4, repeats: int = 3, device="cpu",
            contenders=None, backend: str = "auto") -> list[dict]:
    """One row per contender for the open_clip model ``name`` ("tiny" or an open_clip config)."""
    import open_clip

    for what, value in (("batch_size", batch_size), ("repeats", repeats)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{what} must be an int >= 1, got {value!r}")
    device = torch.device(device)
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    config = model_config(name)
    torch.manual_seed(0)
    initial = {k: v.detach().cpu().clone() for k, v in build_model(config, "cpu").state_dict().items()}
    batch = make_batch(config, batch_size, device)
    loss = open_clip.ClipLoss()
    built = []
    for contender in contenders or CONTENDERS:
        model = build_model(config, device)
        model.load_state_dict(initial)
        model.train()
        gc.collect()
        before = _live_bytes(device)
        opt, step = contender_step(contender, model, batch, loss, backend)
        step()  # warm-up: lazy optimizer state
        gc.collect()
        after = _live_bytes(device)
        state = None if before is None or after is None else max(after - before, 0)
        built.append(dict(contender=contender, model=model, opt=opt, step=step, state=state,
                          times=[], peaks=[]))
    # Round-robin, so that a load change on a shared machine hits every contender alike.
    for _ in range(repeats):
        for b in built:
            sync()
            memory = PeakMemory(device)  # above what is allocated now
            with memory:
                t0 = time.perf_counter()
                b["step"]()
                sync()
                b["times"].append(time.perf_counter() - t0)
            b["peaks"].append(memory.bytes)
    rows = []
    for b in built:
        numel = sum(p.numel() for p in b["model"].parameters())
        transient = None if None in b["peaks"] else max(b["peaks"])
        peak = None if transient is None or b["state"] is None else b["state"] + transient
        rows.append(dict(model=name, params=numel, batch=batch_size, device=str(device),
                         contender=b["contender"], ms_per_step=1e3 * statistics.median(b["times"]),
                         ms_min=1e3 * min(b["times"]), ms_max=1e3 * max(b["times"]),
                         repeats=repeats, weights_mb=numel * 4 / 2**20,
                         state_mb=None if b["state"] is None else b["state"] / 2**20,
                         step_transient_mb=None if transient is None else transient / 2**20,
                         peak_mb=None if peak is None else peak / 2**20,
                         threads=torch.get_num_threads()))
    del built
    gc.collect()
    base = {r["model"]: r for r in rows if r["contender"] == "adamw"}
    for r in rows:
        b = base.get(r["model"])
        r["time_vs_adamw"] = r["ms_per_step"] / b["ms_per_step"] if b else None
        r["min_vs_adamw"] = r["ms_min"] / b["ms_min"] if b else None
        r["peak_vs_adamw"] = (r["peak_mb"] / b["peak_mb"]
                              if b and r["peak_mb"] and b["peak_mb"] else None)
    return rows


def table(rows: list[dict]) -> str:
    def mb(v):
        return "n/a" if v is None else f"{v:.0f}"

    def x(v):
        return "n/a" if v is None else f"{v:.2f}"

    lines = ["| model | params | batch | contender | ms/step (median) | x AdamW | ms/step (min) "
             "| x AdamW | state MB | step transient MB | peak MB beyond weights | x AdamW |",
             "| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['batch']} | "
                     f"{r['contender']} | {r['ms_per_step']:.0f} | {x(r['time_vs_adamw'])} | "
                     f"{r['ms_min']:.0f} | {x(r['min_vs_adamw'])} | {mb(r['state_mb'])} | "
                     f"{mb(r['step_transient_mb'])} | {mb(r['peak_mb'])} | "
                     f"{x(r['peak_vs_adamw'])} |")
    return "\n".join(lines)


def _checked(args) -> tuple[list[str], list[str]]:
    """(models, contenders) of the command line, every value checked before anything is built."""
    try:
        _backends.resolve(args.backend, runnable_device(args.device))
    except (ValueError, RuntimeError) as e:
        raise SystemExit(f"--backend {args.backend}: {e}") from None
    contenders = comma_list(args.contenders, CONTENDERS, "--contenders")
    models = comma_list(args.models, flag="--models")  # tiny and/or open_clip names, checked below
    try:
        importlib.import_module("open_clip")  # every model is built by it, "tiny" included
    except ImportError as e:
        raise SystemExit(f"open_clip is needed ({e}): "
                         "pip install 'open-clip-torch[training]'") from None
    for name in models:
        try:
            model_config(name)
        except ValueError as e:
            raise SystemExit(f"--models: {e}") from None
    return models, contenders


def main(argv=None) -> int:
    p = Parser(prog="flatfused bench-clip", description=__doc__.split("\n\n")[0])
    p.add_argument("--models", default="tiny,ViT-B-32",
                   help="comma-separated: tiny and/or open_clip model names")
    p.add_argument("--batch", type=positive(int), default=4)
    p.add_argument("--repeats", type=positive(int), default=3)
    p.add_argument("--device", default="cpu")
    p.add_argument("--backend", default="auto")
    p.add_argument("--contenders", default=",".join(CONTENDERS))
    p.add_argument("--threads", type=positive(int), default=None, help="torch CPU threads")
    p.add_argument("--json", type=output_path(), default=None,
                   help="also write the rows here (checked before anything is measured)")
    a = p.parse_args(argv)
    models, contenders = _checked(a)
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    for name in models:
        rows += measure(name, a.batch, a.repeats, a.device, contenders, a.backend)
        print(table([r for r in rows if r["model"] == name]).split("\n", 2)[-1], file=sys.stderr)
    print(table(rows))
    if a.json:
        with open(a.json, "w") as f:
            json.dump(rows, f, indent=1)
    return 0


if __name__ == "__main__":
    from flatfused.cli import main as flatfused_main

    # Through the dispatcher, which reports a refused input in one line with exit status 2.
    sys.exit(flatfused_main(["bench-clip", *sys.argv[1:]]))
