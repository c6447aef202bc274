"""Progress on stderr: a tqdm bar on a terminal, one line per long step in a log.

``MATQ_PROGRESS`` chooses: ``auto`` (the default: a bar when stderr is a terminal, lines otherwise),
``bar``, ``log`` or ``off``. In a log a step says nothing unless it lasts :data:`LOG_AFTER` seconds:
then one line when it has run that long, and one when it ends, with its count and time.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
from collections.abc import Iterator

import click
from tqdm import tqdm

LOG_AFTER = 5.0
"""Seconds a step runs before a log hears of it."""


def mode() -> str:
    """``bar``, ``log`` or ``off``, from ``MATQ_PROGRESS`` and whether stderr is a terminal."""
    want = os.environ.get("MATQ_PROGRESS", "auto").strip().lower()
    if want in ("bar", "log", "off"):
        return want
    return "bar" if sys.stderr.isatty() else "log"


class _Bar(tqdm):
    """The ETA from the average rate since the first update, not since the bar was made: a step
    whose first unit comes after a long silence (imports, a graph export) announced hours. The
    elapsed time shown stays the true one. ``smoothing=0`` keeps one average (the first tensor of a
    job also pays for file opening, which made a 4-second slice announce 16 minutes)."""

    _first: tuple[float, float] | None = None
    _ticking: threading.Event | None = None

    def tick(self, every: float = 1.0) -> None:
        """Redraw every ``every`` seconds (once past ``delay``), for a step that counts nothing: tqdm
        draws only on updates, so a graph export with no units to count would show no bar at all."""
        self._ticking = stop = threading.Event()
        wait = max(self.delay, 0.0)

        def run() -> None:
            if stop.wait(wait):
                return
            while not stop.is_set():
                self.refresh()
                stop.wait(every)

        threading.Thread(target=run, daemon=True).start()

    def close(self) -> None:
        if self._ticking is not None:
            self._ticking.set()
        super().close()

    def update(self, n: float = 1) -> bool | None:
        if self._first is None and n:
            self._first = (self._time(), self.n + n)  # from here on units arrive at the working pace
        return super().update(n)

    @property
    def format_dict(self) -> dict:
        d = super().format_dict
        if self._first is not None and self.n > self._first[1]:
            t0, n0 = self._first
            spent = self._time() - t0
            if spent > 0:
                d["rate"] = (self.n - n0) / spent
        return d


def _units(n: float, unit: str) -> str:
    """``"1 tensor"``, ``"236 tensors"``; symbols (tqdm's ``it``, ``B``) stay as they are."""
    word = unit.isalpha() and unit.islower() and len(unit) > 2 and not unit.endswith("s")
    plural = unit + "s" if word and n != 1 else unit
    return f"{n:.0f} {plural}"


class _Log:
    """A step in a log: quiet unless it lasts ``LOG_AFTER`` seconds; tqdm's few attributes callers use."""

    def __init__(self, total: int | None, desc: str, unit: str):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0
        self.t0 = time.perf_counter()
        self._said = False
        self._lock = threading.Lock()
        self._timer = threading.Timer(LOG_AFTER, self._started)
        self._timer.daemon = True
        self._timer.start()

    def _started(self) -> None:
        with self._lock:
            if not self._said:
                self._said = True
                if self.total:
                    done = f"{self.n:.0f} of {_units(self.total, self.unit)} after {LOG_AFTER:g} s"
                else:
                    done = f"running for {LOG_AFTER:g} s"
                click.echo(f"matq: {self.desc}: {done} ...", err=True)

    def update(self, n: float = 1) -> None:
        self.n += n

    def refresh(self) -> None:
        """A log line waits for the step's end (or ``LOG_AFTER``)."""

    def close(self) -> None:
        self._timer.cancel()
        with self._lock:
            if self._said:
                count = f"{_units(self.n, self.unit)}, " if self.n else ""
                click.echo(f"matq: {self.desc}: done, {count}{time.perf_counter() - self.t0:.1f} s", err=True)
            self._said = False

    def __enter__(self) -> _Log:
        return self

    def __exit__(self, *exc) -> None:
        self.close()


class _Off(_Log):
    def __init__(self, total: int | None, desc: str, unit: str):
        self.total, self.desc, self.unit, self.n = total, desc, unit, 0

    def close(self) -> None:
        pass


def bar(total: int | None, desc: str, unit: str = "it", **kw):
    """A bar for ``total`` units (``None``: unknown) of one step; ``delay``: steps shorter than half a
    second show no bar. In a log, lines instead (``unit_scale`` and other tqdm options ignored)."""
    how = mode()
    if how == "log":
        return _Log(total, desc, unit)
    if how == "off":
        return _Off(total, desc, unit)
    kw = {"smoothing": 0, "delay": 0.5, **kw}
    return _Bar(total=total, desc=desc, unit=unit, leave=False, **kw)


@contextlib.contextmanager
def listener(desc: str, total: int | None, unit: str) -> Iterator:
    """For :func:`matq_format.progress.listening`: the library's steps as bars or log lines."""
    with ticking(total, desc, unit) as pb:
        yield pb.update


def ticking(total: int | None, desc: str, unit: str = "it", **kw):
    """:func:`bar`; one without a ``total`` shows its elapsed time, redrawn every second."""
    if total is not None:
        return bar(total, desc, unit, **kw)
    pb = bar(None, desc, unit, bar_format="{desc}: {elapsed}", **kw)
    if isinstance(pb, _Bar):
        pb.tick()
    return pb


def _clock(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}" if s >= 3600 else f"{s // 60}:{s % 60:02d}"


class LayerLog:
    """Progress of a job counted in layers (calibration): in a terminal, a bar with the ETA; otherwise
    (a log file, a pipe) one line per layer on stderr, ``calibrate: layer 3/30 in 8.1 s, 0:25 elapsed,
    ETA 3:40``, the ETA from the mean time per layer so far, the first left out once there are
    others (it also pays for loading the model and tokenizing the text)."""

    def __init__(self, pb, desc: str, stream=None):
        import time

        self.pb, self.desc, self.stream = pb, desc, stream or sys.stderr
        self.clock = time.perf_counter
        self.t0 = self.last = self.clock()
        self.lines = not self.stream.isatty() if stream is not None else mode() == "log"
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
