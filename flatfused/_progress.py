"""The progress bar of the long measurements and of ``flatfused demo`` (stderr): tqdm when
installed; else a line redrawn in place on a terminal, or a line per tenth of the work in a log
(a log file should not get one carriage-returned line per item)."""
from __future__ import annotations

import sys
import time


class ProgressBar:
    """``total`` items; :meth:`update` as they finish, :meth:`set` to name the current one. A
    no-op when ``enable`` is false."""

    def __init__(self, total: int, desc: str = "", enable: bool = True, unit: str = "it"):
        self.total, self.desc, self.n, self.enable = max(int(total), 1), desc, 0, enable
        self.bar, self._last = None, 0.0
        self._tty = enable and sys.stderr.isatty()
        if enable:
            try:
                from tqdm.auto import tqdm  # optional dependency
                self.bar = tqdm(total=self.total, desc=desc or None, unit=unit, leave=False,
                                file=sys.stderr)
            except Exception:  # noqa: BLE001 - any import problem means "no tqdm"
                self.bar = None

    def set(self, desc: str) -> None:
        """Name the item now running (a log gets a line per item named)."""
        self.desc = desc
        if not self.enable:
            return
        if self.bar is not None:
            self.bar.set_description(desc)
        elif self._tty:
            self._draw(force=True)
        else:
            self._log()

    def update(self, n: int = 1) -> None:
        if not self.enable:
            return
        before, self.n = self.n, self.n + n
        if self.bar is not None:
            self.bar.update(n)
        elif self._tty:
            self._draw()
        elif self.n >= self.total or (10 * self.n) // self.total > (10 * before) // self.total:
            self._log()

    def _log(self) -> None:
        sys.stderr.write(f"[{100 * self.n / self.total:3.0f}%] {self.desc}: "
                         f"{self.n}/{self.total}\n")
        sys.stderr.flush()

    def _draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if not force and now - self._last < 0.2 and self.n < self.total:
            return
        self._last = now
        done = int(30 * min(self.n, self.total) / self.total)
        sys.stderr.write(f"\r[{'#' * done}{'.' * (30 - done)}] {100 * self.n / self.total:3.0f}% "
                         f"{self.desc:<28}")
        sys.stderr.flush()

    def close(self) -> None:
        if not self.enable:
            return
        if self.bar is not None:
            self.bar.close()
        elif self._tty:
            sys.stderr.write("\n")
            sys.stderr.flush()
