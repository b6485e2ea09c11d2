"""The progress line of ``flatfused bench`` (stderr): work done, time elapsed, time left."""
from __future__ import annotations

import sys
import time
from typing import Callable, TextIO


class Progress:
    """One line on stderr over a planned run: a list of items ``(label, estimated seconds)`` or
    ``(label, estimated seconds, kind)``, taken in order, each between :meth:`begin` and
    :meth:`end`.

    The estimates need only be right in proportion to each other within a kind: the time left
    is what is left of the plan's estimate, each item's scaled by how long the finished items
    of its kind took against theirs (of any kind while none of its own has finished), so a slow
    or loaded machine scales the estimates as it slows that kind of work. On a terminal the
    line is redrawn in place; elsewhere (a log) a line is written at most every ``log_every``
    seconds.
    """

    def __init__(self, plan: list[tuple], enabled: bool = True,
                 stream: TextIO | None = None, clock: Callable[[], float] = time.perf_counter,
                 log_every: float = 15.0):
        self.plan = [(item[0], item[1], item[2] if len(item) > 2 else "") for item in plan]
        self.enabled, self.stream, self.clock = enabled, stream or sys.stderr, clock
        self.log_every = log_every
        self.t0 = clock()
        self.next = 0  # index of the next item to begin
        self.current: tuple[str, float, str, float] | None = None  # label, estimate, kind, start
        self.done: dict[str, list[float]] = {}  # kind -> [estimated, taken] of finished items
        self._last_log = None
        self._tty = enabled and hasattr(self.stream, "isatty") and self.stream.isatty()

    @property
    def total_estimate(self) -> float:
        return sum(e for _, e, _ in self.plan)

    @property
    def done_estimate(self) -> float:
        return sum(e for e, _ in self.done.values())

    def begin(self, label: str | None = None) -> None:
        """Start the next planned item (``label``, when given, is what the line shows)."""
        if self.current is not None:
            self.end()
        planned, estimate, kind = (self.plan[self.next] if self.next < len(self.plan)
                                   else ("", 0.0, ""))
        self.next += 1
        self.current = (label or planned, estimate, kind, self.clock())
        self._show()

    def end(self) -> None:
        if self.current is None:
            return
        _, estimate, kind, start = self.current
        done = self.done.setdefault(kind, [0.0, 0.0])
        done[0] += estimate
        done[1] += self.clock() - start
        self.current = None
        self._show()

    def scale(self, kind: str | None = None) -> float:
        """Seconds taken per estimated second by the finished items of ``kind`` (of every kind
        while none of it has finished; 1 before anything has)."""
        estimated, taken = self.done.get(kind, (0.0, 0.0))
        if estimated > 0:
            return taken / estimated
        estimated = sum(e for e, _ in self.done.values())
        return sum(t for _, t in self.done.values()) / estimated if estimated > 0 else 1.0

    def seconds_left(self) -> float:
        future = sum(e * self.scale(kind) for _, e, kind in self.plan[self.next:])
        if self.current is None:
            return future
        _, estimate, kind, start = self.current
        return future + max(estimate * self.scale(kind) - (self.clock() - start), 0.0)

    def fraction_done(self) -> float:
        total = self.total_estimate
        return min(self.done_estimate / total, 1.0) if total > 0 else 1.0

    def line(self) -> str:
        elapsed = self.clock() - self.t0
        label = self.current[0] if self.current else "done" if self.next >= len(self.plan) else ""
        width = 20
        filled = int(width * self.fraction_done())
        return (f"[{'#' * filled}{'.' * (width - filled)}] {100 * self.fraction_done():3.0f}% "
                f"{elapsed:4.0f} s, ~{self.seconds_left():4.0f} s left  {label[:48]}")

    def _show(self) -> None:
        if not self.enabled:
            return
        if self._tty:
            self.stream.write(f"\r{self.line():<100}")
            self.stream.flush()
            return
        now = self.clock()
        if self._last_log is None or now - self._last_log >= self.log_every:
            self._last_log = now
            self.stream.write(self.line() + "\n")
            self.stream.flush()

    def close(self) -> None:
        self.end()
        if self.enabled and self._tty:
            self.stream.write("\n")
            self.stream.flush()
