"""NSO optimizer step against the reference: ``python bench/bench_nso.py --numel 16M``.

Same as ``flatfused bench``; see flatfused/benchmark.py for what is measured.
"""
from flatfused.benchmark import main

if __name__ == "__main__":
    raise SystemExit(main())
