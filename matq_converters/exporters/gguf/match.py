"""Which source rows a converted tensor holds: found by content, never assumed.

llama.cpp's converter may reorder rows (Llama's q/k permutation), stack tensors (experts), split or
fuse them along rows. Each row of its output equals, bit for bit, one row of the dequantized
sources, so a row's codes, scales and zero points can be taken from there and the grid kept.
"""

from __future__ import annotations

import numpy as np


def rows_of(out: np.ndarray, src: np.ndarray) -> np.ndarray | None:
    """Index ``i`` with ``src[i] == out`` bitwise, row by row (2-D float32 arrays); None if some row
    of ``out`` is no row of ``src``."""
    if out.ndim != 2 or src.ndim != 2 or out.shape[1] != src.shape[1] or out.dtype != src.dtype:
        return None
    if out.shape == src.shape and np.array_equal(_bits(out), _bits(src)):
        return np.arange(len(src))
    probe = _probe(src.shape[1])
    fs, fo = src @ probe, out @ probe
    order = np.argsort(fs, kind="stable")
    pos = np.clip(np.searchsorted(fs[order], fo), 0, len(src) - 1)
    idx = order[pos]
    bad = np.flatnonzero(~np.all(_bits(src)[idx] == _bits(out), axis=1))
    for i in bad:  # fingerprints that tie or differ by rounding: compare the candidates exactly
        hit = np.flatnonzero(np.all(_bits(src) == _bits(out[i]), axis=1))
        if not len(hit):
            return None
        idx[i] = hit[0]
    return idx


def _probe(cols: int) -> np.ndarray:
    """A fixed random direction: one float per row that tells rows apart."""
    return np.random.default_rng(cols).standard_normal(cols)


def _bits(x: np.ndarray) -> np.ndarray:
    return x.view(np.uint32)
