"""End-to-end training steps under DistributedDataParallel, on CPU ranks over gloo.

``flatfused bench --ddp-ranks N`` runs this part: the end-to-end models of :mod:`.e2e`, each
wrapped in DDP on N spawned processes (one thread each, a different batch per rank), timed
round-robin across the contenders as the single-process end-to-end benchmark is, with a
communication hook counting the all-reduced buckets. It shows
what the single-process numbers cannot: the reference's trainer synchronises the gradients in
each of its 1 + 2K backward passes, flatfused's ``step(closure)`` in the last one only.
"""
from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch

from flatfused.distributed import exit_without_teardown

from .e2e import e2e_ratios, e2e_step, make_model

DDP_CONTENDERS = ["adamw", "nso reference", "nso baseline", "nso flatfused"]


def _counting_allreduce(calls: list, bucket):
    import torch.distributed as dist
    from torch.distributed.algorithms.ddp_comm_hooks import default_hooks

    calls[0] += 1
    return default_hooks.allreduce_hook(dist.group.WORLD, bucket)


def _measure(rank: int, spec: dict) -> list[dict]:
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel as DDP

    rows = []
    for name in spec["models"]:
        torch.manual_seed(0)
        state = {k: v.clone() for k, v in make_model(name).state_dict().items()}
        g = torch.Generator().manual_seed(1000 + rank)  # each rank its own batch
        batch = (torch.randn(spec["batch"], 3, 32, 32, generator=g),
                 torch.randint(0, 10, (spec["batch"],), generator=g))
        built = []
        numel = 0
        for contender in spec["contenders"]:
            model = make_model(name)
            numel = sum(p.numel() for p in model.parameters())
            model.load_state_dict(state)
            model.train()
            ddp = DDP(model)
            calls = [0]
            ddp.register_comm_hook(calls, _counting_allreduce)
            _, step = e2e_step(contender, ddp, batch, spec["backend"])
            step()  # warm-up: lazy state
            calls[0] = 0
            built.append((contender, step, calls, []))
        for _ in range(spec["repeats"]):
            for contender, step, calls, times in built:
                dist.barrier()
                t0 = time.perf_counter()
                step()
                dist.barrier()  # a step ends when the slowest rank is done
                times.append(time.perf_counter() - t0)
        for contender, step, calls, times in built:
            rows.append(dict(model=name, params=numel, batch=spec["batch"], ranks=spec["world"],
                             contender=contender, ms_per_step=1e3 * statistics.median(times),
                             ms_min=1e3 * min(times), repeats=spec["repeats"],
                             buckets_per_step=calls[0] / spec["repeats"]))
        del built
    return rows


def _worker(rank: int, world: int, init_file: str, spec: dict, out_path: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        rows = _measure(rank, dict(spec, world=world))
        if rank == 0:
            Path(out_path).write_text(json.dumps(rows))
    finally:
        dist.destroy_process_group()
    exit_without_teardown()  # measured and written (a failure raised above)


def _syncs(rows: list[dict]) -> None:
    """All-reduced buckets relative to the AdamW step of the same model and batch: AdamW
    synchronises once per step, so ``syncs_per_step`` counts gradient synchronisations."""
    base = {(r["model"], r["batch"]): r for r in rows if r["contender"] == "adamw"}
    for r in rows:
        b = base.get((r["model"], r["batch"]))
        r["syncs_per_step"] = (r["buckets_per_step"] / b["buckets_per_step"]
                               if b and b["buckets_per_step"] else None)


def run_e2e_ddp(models: list[str], ranks: int = 2, batch_size: int = 32, repeats: int = 5,
                backend: str = "auto", contenders: list[str] | None = None) -> list[dict]:
    """Rows of DDP training steps on ``ranks`` CPU processes (see the module docstring)."""
    if ranks < 2:
        raise ValueError(f"a DDP benchmark needs at least 2 ranks, got {ranks}")
    import torch.multiprocessing as mp

    spec = dict(models=list(models), batch=batch_size, repeats=repeats, backend=backend,
                contenders=list(contenders or DDP_CONTENDERS))
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "rows.json")
        mp.spawn(_worker, args=(ranks, os.path.join(tmp, "init"), spec, out), nprocs=ranks)
        rows = json.loads(Path(out).read_text())
    e2e_ratios(rows)
    _syncs(rows)
    return rows


def e2e_ddp_table(report: dict) -> str:
    lines = ["| model | params | ranks | batch per rank | contender | ms/step (median) | "
             "vs AdamW step | gradient syncs per step |",
             "| --- | ---: | ---: | ---: | --- | ---: | ---: | ---: |"]
    for r in report.get("e2e_ddp", []):
        ratio = f"{r['ratio_vs_adamw']:.2f}x" if r.get("ratio_vs_adamw") is not None else "-"
        syncs = f"{r['syncs_per_step']:.0f}" if r.get("syncs_per_step") is not None else "-"
        lines.append(f"| {r['model']} | {r['params'] / 1e6:.1f}M | {r['ranks']} | {r['batch']} | "
                     f"{r['contender']} | {r['ms_per_step']:.1f} | {ratio} | {syncs} |")
    return "\n".join(lines)
