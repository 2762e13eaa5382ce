"""Progress of a data-set run on stderr: a tqdm bar (samples/s, ETA) on a terminal, a plain line every
:data:`PLAIN_SECONDS` seconds otherwise (a log file, CI), nothing with ``--quiet``."""

from __future__ import annotations

import os
import sys
import time

__all__ = ["PLAIN_SECONDS", "Progress"]

#: Seconds between two plain progress lines when stderr is not a terminal.
PLAIN_SECONDS = 10.0


def _clock(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class Progress:
    """``update(n)`` after every ``n`` samples handled (explained or skipped); ``close()`` at the end.  ``done``
    samples were handled by an earlier run (resume): they count towards the total, not towards the rate."""

    def __init__(self, total: int, *, done: int = 0, label: str = "explain", quiet: bool = False, stream=None):
        self.total, self.count, self.label = total, done, label
        self.stream = stream if stream is not None else sys.stderr
        self.start = time.monotonic()
        self.last_line = self.start
        self.new = 0
        self.bar = None
        self.quiet = quiet
        if quiet:
            return
        if self.stream.isatty():
            from tqdm import tqdm

            try:
                sized = os.get_terminal_size(self.stream.fileno()).columns > 0
            except (OSError, ValueError):
                sized = False
            # a terminal that reports no size (a bare pty) gets a fixed one: tqdm hides bars on a 0-line screen
            self.bar = tqdm(total=total, initial=done, unit=" samples", desc=label, file=self.stream,
                            dynamic_ncols=sized, ncols=None if sized else 100, nrows=None if sized else 24,
                            smoothing=0.1)

    def update(self, n: int) -> None:
        self.count += n
        self.new += n
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.update(n)
            return
        now = time.monotonic()
        if now - self.last_line >= PLAIN_SECONDS:
            self.last_line = now
            self.stream.write(self.line(now) + "\n")
            self.stream.flush()

    def rate(self, now: float | None = None) -> float:
        elapsed = (now or time.monotonic()) - self.start
        return self.new / elapsed if elapsed > 0 else 0.0

    def line(self, now: float) -> str:
        rate = self.rate(now)
        eta = _clock((self.total - self.count) / rate) if rate > 0 else "?"
        percent = 100.0 * self.count / self.total if self.total else 100.0
        return (f"{self.label}: {self.count}/{self.total} samples ({percent:.0f} %), {rate:.1f} samples/s, "
                f"ETA {eta}")

    def close(self) -> None:
        if self.quiet:
            return
        if self.bar is not None:
            self.bar.close()
            return
        now = time.monotonic()
        self.stream.write(f"{self.label}: {self.count}/{self.total} samples in {_clock(now - self.start)} "
                          f"({self.rate(now):.1f} samples/s)\n")
        self.stream.flush()
