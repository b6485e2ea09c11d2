"""The finding of "Sharpness-Aware Minimization and the Edge of Stability" on a CPU in about
three minutes, checked from the raw data (not by eye):

    python bench/sam_edge_cpu.py            # writes bench/results/sam_edge/

It runs ``flatfused sam-edge image-classification`` twice with the same flags, SAM (``--rho
0.01``) and gradient descent (``--rho 0``): the seed's 4-layer MLP (width 128 instead of 1000)
trained full-batch on 1000 generated digits with step size 1 (2/eta = 2) for 500 steps, the
Hessian checked every 10 steps. Then it checks, over the second half of each run (the checks at
steps >= 250, when the dynamics have settled):

- SAM: the operator norm starts below the SAM edge (first check < 0.8 x edge), reaches it (some
  check >= 0.95 x edge), and then stays near it (median |H| / edge within 5%, every check within
  10%) and below 2/eta (every check <= 0.8 x 2/eta), where the edge itself is clearly below
  2/eta (every edge <= 0.8 x 2/eta, so "near the edge" is not "near 2/eta");
- gradient descent: the operator norm starts below 2/eta (first check < 0.8 x 2/eta) and settles
  near it (median |H| / (2/eta) within 5%, every check within 10%).

Each run's raw data, run record and figures (PNG) go to ``<out>/sam`` and ``<out>/gd``; the
verdict, each claim's numbers, the exact commands, wall times and load averages to
``<out>/finding.json``, and a two-panel figure to ``<out>/finding.png``. Exit status 1 when a
claim fails.
"""
from __future__ import annotations

import argparse
import json
import os
import shlex
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def command(out: Path, rho: float, a) -> list:
    return ["flatfused", "sam-edge", "image-classification", "--rho", str(rho),
            "--step_size", str(a.step_size), "--batch_size", str(a.examples),
            "--mini_training_set_num_batches", "1", "--mini_test_set_num_batches", "1",
            "--mlp_width", str(a.width), "--hessian_check_steps", str(a.check_every),
            "--num_steps", str(a.num_steps), "--threads", str(a.threads),
            "--output_dir", str(out), "--figure_format", "png"]


def read_raw(path: Path) -> list:
    header, *lines = path.read_text().splitlines()
    names = header[2:].split()
    return [dict(zip(names, map(float, line.split()))) for line in lines]


def claim(what, value, holds) -> dict:
    return {"claim": what, "value": round(value, 4), "holds": bool(holds)}


def check_sam(rows, settled_from) -> list:
    first, late = rows[0], [r for r in rows if r["step"] >= settled_from]
    ratios = [r["hessian_norm"] / r["sam_edge"] for r in late]
    return [
        claim("first check: |H| / SAM edge < 0.8", first["hessian_norm"] / first["sam_edge"],
              first["hessian_norm"] < 0.8 * first["sam_edge"]),
        claim("some check: |H| / SAM edge >= 0.95",
              max(r["hessian_norm"] / r["sam_edge"] for r in rows),
              any(r["hessian_norm"] >= 0.95 * r["sam_edge"] for r in rows)),
        claim("settled: median |H| / SAM edge within [0.95, 1.05]", statistics.median(ratios),
              0.95 <= statistics.median(ratios) <= 1.05),
        claim("settled: min |H| / SAM edge >= 0.9", min(ratios), min(ratios) >= 0.9),
        claim("settled: max |H| / SAM edge <= 1.1", max(ratios), max(ratios) <= 1.1),
        claim("settled: max |H| / (2/eta) <= 0.8",
              max(r["hessian_norm"] / r["two_over_eta"] for r in late),
              all(r["hessian_norm"] <= 0.8 * r["two_over_eta"] for r in late)),
        claim("settled: max SAM edge / (2/eta) <= 0.8",
              max(r["sam_edge"] / r["two_over_eta"] for r in late),
              all(r["sam_edge"] <= 0.8 * r["two_over_eta"] for r in late)),
    ]


def check_gd(rows, settled_from) -> list:
    first, late = rows[0], [r for r in rows if r["step"] >= settled_from]
    ratios = [r["hessian_norm"] / r["two_over_eta"] for r in late]
    return [
        claim("first check: |H| / (2/eta) < 0.8", first["hessian_norm"] / first["two_over_eta"],
              first["hessian_norm"] < 0.8 * first["two_over_eta"]),
        claim("settled: median |H| / (2/eta) within [0.95, 1.05]", statistics.median(ratios),
              0.95 <= statistics.median(ratios) <= 1.05),
        claim("settled: min |H| / (2/eta) >= 0.9", min(ratios), min(ratios) >= 0.9),
        claim("settled: max |H| / (2/eta) <= 1.1", max(ratios), max(ratios) <= 1.1),
    ]


def figure(runs: dict, path: Path) -> None:
    from flatfused.sharpness import _plot

    fig, axes = _plot.figure(1, 2, height=3.6, width=5.2)
    for ax, (name, title) in zip(axes[0], (("sam", "SAM, rho = {rho}"),
                                           ("gd", "gradient descent (rho = 0)"))):
        rows, rho = runs[name]["rows"], runs[name]["rho"]
        steps = [r["step"] for r in rows]
        ax.plot(steps, [r["hessian_norm"] for r in rows], "b.-", ms=3, label=r"$\|H\|_{op}$")
        if rho > 0:  # at rho = 0 the SAM edge is 2/eta
            ax.plot(steps, [r["sam_edge"] for r in rows], "g-", label="SAM edge")
        ax.axhline(rows[0]["two_over_eta"], color="m", label=r"$2/\eta$")
        ax.set_ylim(0, 1.15 * max(max(r["hessian_norm"] for r in rows), rows[0]["two_over_eta"]))
        ax.set_title(title.format(rho=rho), fontsize=10)
        ax.set_xlabel("step")
        ax.legend(loc="lower right", fontsize=8)
    _plot.save(fig, str(path))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=ROOT / "bench" / "results" / "sam_edge")
    p.add_argument("--rho", type=float, default=0.01)
    p.add_argument("--step_size", type=float, default=1.0)
    p.add_argument("--examples", type=int, default=1000)
    p.add_argument("--width", type=int, default=128)
    p.add_argument("--num_steps", type=int, default=500)
    p.add_argument("--check_every", type=int, default=10)
    p.add_argument("--threads", type=int, default=1)
    a = p.parse_args(argv)
    a.out = a.out.resolve()
    a.out.mkdir(parents=True, exist_ok=True)
    if a.out.is_relative_to(ROOT):  # the commands run in ROOT: record paths relative to it
        a.out = a.out.relative_to(ROOT)
    runs, started = {}, time.time()
    for name, rho in (("sam", a.rho), ("gd", 0.0)):
        out = a.out / name
        cmd = command(out, rho, a)
        load = os.getloadavg()
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "flatfused"] + cmd[1:], cwd=ROOT,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            print(done.stdout + done.stderr, file=sys.stderr)
            return 1
        (ROOT / out / "log.txt").write_text(done.stdout)
        rows = read_raw(ROOT / out / "raw.txt")
        settled = a.num_steps // 2
        runs[name] = {"rho": rho, "command": shlex.join(cmd), "wall_seconds": round(wall, 1),
                      "load_average_before": [round(v, 2) for v in load],
                      "load_average_after": [round(v, 2) for v in os.getloadavg()],
                      "claims": (check_sam if rho > 0 else check_gd)(rows, settled),
                      "rows": rows}
        print(f"{name}: {wall:.1f} s, load average {load[0]:.2f} before")
    figure(runs, ROOT / a.out / "finding.png")
    holds = all(c["holds"] for r in runs.values() for c in r["claims"])
    report = {"finding_holds": holds, "settled_from_step": a.num_steps // 2,
              "total_wall_seconds": round(time.time() - started, 1),
              "runs": {k: {key: v for key, v in r.items() if key != "rows"}
                       for k, r in runs.items()}}
    (ROOT / a.out / "finding.json").write_text(json.dumps(report, indent=1) + "\n")
    for name, run in runs.items():
        for c in run["claims"]:
            print(f"{name}: {'ok  ' if c['holds'] else 'FAIL'} {c['claim']}: {c['value']}")
    print("the finding holds" if holds else "the finding does NOT hold")
    return 0 if holds else 1


if __name__ == "__main__":
    raise SystemExit(main())
