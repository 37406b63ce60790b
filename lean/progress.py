"""A count-and-ETA progress line on stderr: redrawn in place on a terminal, a few lines in a log."""

import sys
import time


class Progress:
    """`label: done/total (seconds, ETA)`, with `rate` naming a unit, its rate too (e.g. "images/s")."""

    def __init__(self, total, label, stream=None, log_every_s=5.0, rate=None):
        self.total, self.label, self.done, self.rate = total, label, 0, rate
        self.stream = stream or sys.stderr
        self.live = self.stream.isatty()
        self.log_every_s = log_every_s
        self.start = self.last_print = time.perf_counter()

    def update(self, n=1):
        self.done += n
        now = time.perf_counter()
        if (
            self.done == self.total
            or (self.live and now - self.last_print > 0.1)
            or now - self.last_print > self.log_every_s
        ):
            self.last_print = now
            self._print(now)

    def _print(self, now):
        elapsed = now - self.start
        eta = elapsed / self.done * (self.total - self.done) if self.done else 0.0
        pace = f", {self.done / max(elapsed, 1e-9):.1f} {self.rate}" if self.rate else ""
        line = f"{self.label}: {self.done}/{self.total} ({elapsed:.1f} s{pace}, ETA {eta:.1f} s)"
        end = "\n" if self.done == self.total or not self.live else ""
        print(("\r" if self.live else "") + line, end=end, file=self.stream, flush=True)
