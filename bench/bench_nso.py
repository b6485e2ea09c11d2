"""Same as ``flatfused bench`` (``python bench/bench_nso.py --numel 16M --optimizers nso``);
see flatfused/benchmark/ and docs/benchmarks.md for what is measured.
"""
from flatfused.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
