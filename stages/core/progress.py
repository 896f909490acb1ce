"""Progress of a long job that is not training (sampling, features, encoding, trajectories): one line
at most every `seconds` seconds, and at the end, with the count done, the rate and an ETA.

    progress = Progress("[sample]", total=6144, unit="images")
    for ...:
        progress.update(done, extra="...")

The training stages print their own status line (stages/training/loop.py) with the loss beside it.
"""

import time


def duration(seconds):
    """1h02m03s, 2m03s, 3s."""
    seconds = int(max(0, seconds))
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds // 60 % 60:02d}m{seconds % 60:02d}s"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


class Progress:
    """`total` units (images, trajectories, ...) to do; `clock` for tests."""

    def __init__(self, prefix, total, unit, seconds=10.0, clock=time.perf_counter):
        self.prefix, self.total, self.unit, self.seconds, self.clock = prefix, total, unit, seconds, clock
        self.t0 = self.t_last = clock()

    def line(self, done, extra=""):
        """The progress line for `done` units now: count, percentage, rate, elapsed time and ETA."""
        elapsed = self.clock() - self.t0
        rate = done / elapsed if elapsed > 0 else 0.0
        eta = (self.total - done) / rate if rate > 0 else float("inf")
        pct = 100.0 * done / self.total if self.total else 100.0
        parts = [f"{self.prefix} {done}/{self.total} {self.unit} ({pct:.1f}%)", f"{self.unit}/s {rate:.3g}",
                 f"elapsed {duration(elapsed)}", "eta " + (duration(eta) if eta != float("inf") else "?")]
        return "  ".join(parts + ([extra] if extra else []))

    def update(self, done, extra=""):
        """Print the line if `seconds` have passed since the last one, or at the end (done = total)."""
        now = self.clock()
        if done < self.total and now - self.t_last < self.seconds:
            return
        self.t_last = now
        print(self.line(done, extra), flush=True)
