"""A progress bar for the long measurements: tqdm when installed, else a counter on stderr."""
from __future__ import annotations

import sys



class _Progress:
    """tqdm when installed, else a one-line counter on stderr; a no-op when disabled."""

    def __init__(self, total: int, desc: str, enable: bool):
        self.total, self.desc, self.n, self.bar = total, desc, 0, None
        self.enable = enable
        if not enable:
            return
        try:
            from tqdm.auto import tqdm  # optional dependency
            self.bar = tqdm(total=total, desc=desc, leave=False)
        except Exception:  # noqa: BLE001 - any import problem means "no tqdm"
            self.bar = None

    def update(self, n: int = 1):
        if not self.enable:
            return
        self.n += n
        if self.bar is not None:
            self.bar.update(n)
        elif sys.stderr.isatty():
            sys.stderr.write(f"\r{self.desc}: {self.n}/{self.total}")
            sys.stderr.flush()
        elif self.n >= self.total or (10 * self.n) // self.total > (10 * (self.n - n)) // self.total:
            # a log file gets a line per tenth, not one carriage-returned line per product
            sys.stderr.write(f"{self.desc}: {self.n}/{self.total}\n")
            sys.stderr.flush()

    def close(self):
        if not self.enable:
            return
        if self.bar is not None:
            self.bar.close()
        elif sys.stderr.isatty():
            sys.stderr.write("\n")
            sys.stderr.flush()
