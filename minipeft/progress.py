"""Progress and time left for long work (a 7B load takes minutes), on a terminal and in plain logs alike.

    loading weights: 3.21 / 13.48 GB (24%), 0:35 elapsed, about 1:52 left

On a terminal the line is redrawn in place a few times a second; in a log (a file, a pipe) a new line is
written every `every` seconds, so the log shows progress without a carriage-return smear. Work done in
less than QUIET_UNDER seconds prints nothing.
"""

import sys
import time


def clock(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    return f"{minutes // 60}:{minutes % 60:02d}:{seconds:02d}" if minutes >= 60 else f"{minutes}:{seconds:02d}"


class Progress:
    QUIET_UNDER = 2.0

    def __init__(self, label: str, total: float, unit: str = "GB", scale: float = 1e9, stream=None,
                 every: float = 10.0):
        self.label, self.total, self.unit, self.scale = label, total, unit, scale
        self.stream = stream or sys.stdout
        self.terminal = self.stream.isatty()
        self.every = 0.25 if self.terminal else every
        self.started = self.last = time.monotonic()
        self.done, self.shown = 0.0, False

    def line(self, now: float) -> str:
        elapsed = now - self.started
        fraction = self.done / self.total if self.total else 1.0
        left = f", about {clock(elapsed / fraction * (1 - fraction))} left" if 0 < fraction < 1 else ""
        digits = 0 if self.scale == 1 else 2  # counted things (batches, tokens) are whole
        return (f"{self.label}: {self.done / self.scale:.{digits}f} / {self.total / self.scale:.{digits}f} {self.unit} "
                f"({fraction:.0%}), {clock(elapsed)} elapsed{left}")

    def advance(self, amount: float):
        self.done += amount
        now = time.monotonic()
        if now - self.last >= self.every and now - self.started >= self.QUIET_UNDER:
            self.last, self.shown = now, True
            self.stream.write(("\r" if self.terminal else "") + self.line(now) + ("" if self.terminal else "\n"))
            self.stream.flush()

    def close(self):
        now = time.monotonic()
        if not self.shown and now - self.started < self.QUIET_UNDER:
            return
        self.stream.write(("\r" if self.terminal else "") + self.line(now) + "\n")
        self.stream.flush()
