"""tqdm progress bars that stay quiet when stderr is not a terminal."""

from __future__ import annotations

import sys

from tqdm import tqdm


def bar(total: int | None, desc: str, unit: str = "it", **kw) -> tqdm:
    """``smoothing=0``: the ETA from the average rate since the start, not from the last few updates
    (the first tensor of a job also pays for imports and file opening, which made a 4-second slice
    announce 16 minutes); ``delay``: jobs shorter than half a second show no bar."""
    kw = {"smoothing": 0, "delay": 0.5, **kw}
    return tqdm(total=total, desc=desc, unit=unit, disable=not sys.stderr.isatty(), leave=False, **kw)


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class LayerLog:
    """Progress of a job counted in layers (calibration): in a terminal, a bar with the ETA; otherwise
    (a log file, a pipe) one line per layer on stderr, ``calibrate: layer 3/30 in 8.1 s, 0:25 elapsed,
    ETA 3:40``, the ETA from the mean time per layer so far, the first left out once there are
    others (it also pays for loading the model and tokenizing the text)."""

    def __init__(self, pb: tqdm, desc: str, stream=None):
        import time

        self.pb, self.desc, self.stream = pb, desc, stream or sys.stderr
        self.clock = time.perf_counter
        self.t0 = self.last = self.clock()
        self.lines = not self.stream.isatty()
        self.times: list[float] = []

    def __call__(self, done: int, total: int) -> None:
        now = self.clock()
        self.pb.total = total
        self.pb.update(done - self.pb.n)
        self.times.append(now - self.last)
        if self.lines:
            elapsed = now - self.t0
            steady = self.times[1:] or self.times
            eta = sum(steady) / len(steady) * (total - done)
            print(
                f"{self.desc}: layer {done}/{total} in {now - self.last:.1f} s, {_clock(elapsed)} elapsed, "
                f"ETA {_clock(eta)}",
                file=self.stream,
                flush=True,
            )
        self.last = now
