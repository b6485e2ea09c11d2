"""The run record: a JSON file with the command, the resolved arguments, the data, the model,
the environment and the outcome of a ``flatfused sam-edge`` run."""
from __future__ import annotations

import json
import math
import os
import platform
import sys

import torch


def _cpu_name() -> str:
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def load_average():
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def environment(device: torch.device) -> dict:
    import flatfused

    env = {"python": sys.version.split()[0], "platform": platform.platform(),
           "torch": torch.__version__, "flatfused": getattr(flatfused, "__version__", None),
           "device": str(device), "cpu": _cpu_name(), "cpu_count": os.cpu_count(),
           "torch_threads": torch.get_num_threads(), "load_average_at_start": load_average()}
    if device.type == "cuda":
        env["gpu"] = torch.cuda.get_device_name(device)
        env["cuda"] = torch.version.cuda
    return env


def _clean(value):
    """Strict JSON: non-finite floats become null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_clean(v) for v in value]
    return value


def write(path: str, record: dict) -> str:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(_clean(record), f, indent=1, allow_nan=False)
        f.write("\n")
    return path
