"""The ``flatfused`` command."""
from __future__ import annotations

import argparse
import sys


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="flatfused", description=__doc__)
    parser.add_argument("command", choices=["bench", "info"],
                        help="bench: NSO step vs the reference; info: backends available here")
    if not argv or argv[0] in ("-h", "--help"):
        parser.print_help()
        return 0
    command, rest = argv[0], argv[1:]
    if command == "bench":
        from .benchmark import main as bench_main

        return bench_main(rest)
    if command == "info":
        import torch

        from . import _extension, backends

        print(f"torch {torch.__version__} (CUDA {torch.version.cuda})")
        print(f"extension: {_extension.load_error() or 'loaded'}; "
              f"CUDA kernels built: {_extension.has_cuda_kernels()}")
        for device in ["cpu"] + (["cuda"] if torch.cuda.is_available() else []):
            print(f"{device}: backends {backends.available(device)}, "
                  f"auto -> {backends.resolve('auto', device)}")
        return 0
    parser.error(f"unknown command {command!r}")
    return 2


if __name__ == "__main__":
    raise SystemExit(main())
