"""The speed and memory goals, checked against a report (benchmarks, not tests)."""
from __future__ import annotations

from .spec import OPTIMIZERS, format_count


def check_targets(report: dict) -> list[dict]:
    """The goals, as far as this run measured them (benchmarks, not tests)."""
    out = []
    results = report.get("results", [])
    n16 = 16 << 20

    def find(opt, base, contender, numel=n16, dtype="float32"):
        for r in results:
            if (r["optimizer"], r["base"], r["contender"], r["numel"], r["dtype"]) == (
                    opt, base, contender, numel, dtype):
                return r
        return None

    ref = find("nso", "sgd", "reference")
    if ref:
        for contender, api, goal in (("flatfused[cpu]", "step(closure)", 6.0),
                                     ("flatfused[cpu] 3-call", "three-call API", 5.0)):
            r = find("nso", "sgd", contender)
            for suffix, what in (("", "medians"), ("_fastest", "fastest")):
                if r and r.get(f"speedup_vs_reference{suffix}") is not None:
                    v = r[f"speedup_vs_reference{suffix}"]
                    out.append(dict(target=f"CPU 16M fp32 NSO/SGD-momentum {api} vs reference "
                                           f"({what})", measured=v, goal=f">= {goal}x",
                                    met=v >= goal))
        r = find("nso", "sgd", "flatfused[cpu]")
        for suffix, what in (("", "medians"), ("_fastest", "fastest")):
            if r and r.get(f"speedup_vs_baseline{suffix}") is not None:
                v = r[f"speedup_vs_baseline{suffix}"]
                out.append(dict(target=f"CPU 16M fp32 NSO/SGD-momentum step(closure) vs baseline "
                                       f"({what})", measured=v, goal=">= 2.5x", met=v >= 2.5))
    for c in report.get("calibration", []):
        if c["numel"] == n16 and c["dtype"] == "float32" and "cpu" in c["flatfused_noise_ms"]:
            ratio = c["torch_normal_ms"] / c["flatfused_noise_ms"]["cpu"]
            out.append(dict(target="CPU 16M normals: flatfused noise_ vs torch normal_",
                            measured=ratio, goal=">= 4x", met=ratio >= 4))
    for r in results:
        if r["contender"].startswith("flatfused[") and not r["contender"].endswith("3-call") \
                and r["numel"] == n16 and r["dtype"] == "float32":
            copies = r["state_param_copies_beyond_base"]
            # Decoupled WSAM keeps the clean gradient too: its base step runs after both passes,
            # so that a second pass that raises leaves weights and base state as they were.
            limit = 2 if OPTIMIZERS[r["optimizer"]]["kind"] == "wsam" else 1
            out.append(dict(target=f"state beyond base, {r['optimizer']}/{r['base']} "
                                   f"{r['contender']} (parameter copies)",
                            measured=copies, goal=f"<= {limit}", met=copies <= limit + 1e-9))
    out += _gpu_bandwidth_targets(report)
    for r in report.get("e2e", []):
        if r["contender"] == "nso flatfused" and r["ratio_vs_adamw"] is not None:
            for key, what in (("ratio_vs_adamw_paired", "paired by round, median"),
                              ("ratio_vs_adamw", "medians"), ("ratio_vs_adamw_min", "fastest")):
                if r.get(key) is not None:
                    out.append(dict(target=f"end to end {r['model']} batch {r['batch']}: NSO "
                                           f"step / AdamW step ({what})",
                                    measured=r[key], goal="<= 2.1x", met=r[key] <= 2.1))
    return out


GPU_TARGET_MIN_NUMEL = 64 << 20
GPU_TARGET_FLOOR_FRACTION = 0.8


def _fraction(r: dict) -> float:
    """The row's share of its floor (a schema-2 report: of the copy bandwidth)."""
    return r["floor_fraction"] if "floor_fraction" in r else r["copy_fraction"]


def _gpu_bandwidth_targets(report: dict) -> list[dict]:
    """GPU: every fused optimizer step at 64M+ parameters, fp32 and bf16, at >= 80% of its
    floor (the fastest STREAM kernel measured in the same run). One line per backend and dtype,
    naming the slowest (optimizer, base, size) against the goal, so a miss cannot hide behind
    an average."""
    if not str(report.get("device", "cpu")).startswith("cuda"):
        return []
    gpu = (report.get("machine") or {}).get("gpu") or "GPU"
    worst: dict[tuple[str, str], dict] = {}
    for r in report.get("results", []):
        if not r["contender"].startswith("flatfused[") or r["contender"].endswith("3-call") \
                or r["numel"] < GPU_TARGET_MIN_NUMEL or r["dtype"] not in ("float32", "bfloat16"):
            continue
        key = (r["contender"], r["dtype"])
        if key not in worst or _fraction(r) < _fraction(worst[key]):
            worst[key] = r
    return [dict(target=f"{gpu} {format_count(GPU_TARGET_MIN_NUMEL)}+ {dtype} {contender} steps: "
                        f"lowest share of the floor ({r['optimizer']}/{r['base']} at "
                        f"{format_count(r['numel'])})",
                 measured=_fraction(r), goal=f">= {GPU_TARGET_FLOOR_FRACTION:.1f} of the floor",
                 met=_fraction(r) >= GPU_TARGET_FLOOR_FRACTION)
            for (contender, dtype), r in sorted(worst.items())]
