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
