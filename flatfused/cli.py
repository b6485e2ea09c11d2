"""The ``flatfused`` command: ``flatfused <command> [arguments]``.

Each command lives in its own module with a ``main(argv) -> int``; ``COMMANDS`` maps the
command's name to that module and a one-line description. ``python -m flatfused`` is the same
command (flatfused/__main__.py).
"""
from __future__ import annotations

import importlib
import sys

COMMANDS: dict[str, tuple[str, str]] = {
    "bench": ("flatfused.benchmark", "time the optimizers against the reference, the best pure "
                                     "PyTorch and other libraries, on their measured floor"),
    "bench-clip": ("flatfused.integrations.open_clip_bench",
                   "one CLIP training step (open_clip): AdamW vs flatfused NSO vs the NSO reference"),
    "demo": ("flatfused.demo", "SGD, SAM, NSO and their cheap schedules at matched compute on a "
                               "small noisy-label task: accuracy, flatness, the gains kept"),
    "info": ("flatfused.cli", "the backends and kernels available here"),
    "sam-edge": ("flatfused.sam_edge.cli",
                 "the SAM edge-of-stability experiments: Hessian norm vs SAM edge and 2/eta"),
    "sharpness": ("flatfused.sharpness.cli", "measure a saved model's flatness (Hessian, Keskar, noise stability)"),
}


def info_main(argv) -> int:
    import torch

    from . import _extension, backends

    if argv in (["-h"], ["--help"]):
        print(f"usage: flatfused info\n\n{COMMANDS['info'][1]}")
        return 0
    if argv:
        print(f"flatfused info: error: takes no arguments, got {argv}", file=sys.stderr)
        return 2
    print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
    print(f"extension: {_extension.load_error() or 'loaded'}; "
          f"CUDA kernels built: {_extension.has_cuda_kernels()}")
    for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
        print(f"{device}: backends {backends.available(device)}, "
              f"auto -> {backends.resolve('auto', device)}")
    return 0


def _usage() -> str:
    width = max(map(len, COMMANDS))
    lines = ["usage: flatfused <command> [arguments]   (flatfused <command> --help for more)", "",
             "commands:"]
    lines += [f"  {name:<{width}}  {about}" for name, (_, about) in COMMANDS.items()]
    return "\n".join(lines)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(_usage())
        return 0
    command, rest = argv[0], argv[1:]
    if command not in COMMANDS:
        print(f"flatfused: error: unknown command {command!r}; choose from {', '.join(COMMANDS)} "
              "(see flatfused --help)", file=sys.stderr)
        return 2
    if command == "info":
        return info_main(rest)
    module = importlib.import_module(COMMANDS[command][0])
    try:
        return int(module.main(rest) or 0)
    except SystemExit as exc:
        # A command refuses its input with SystemExit(message): one line and the usage status
        # 2, as argparse's own refusals (an integer status, already reported) exit.
        if isinstance(exc.code, str):
            message = " ".join(exc.code.splitlines())
            print(f"flatfused {command}: error: {message}", file=sys.stderr)
            return 2
        raise


if __name__ == "__main__":
    raise SystemExit(main())
