"""The multi-width objective without training: codes and scales chosen for the lambda-weighted error
of every served slice at once (the train-free analogue of MatQuant's Eq. 7).

Built on :mod:`matq_format.numerics` (the spec's formulas). Calibration passes an importance per
input column; multi-width GPTQ (``matq_converters.importers.hf.gptq``) builds on these functions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np

from . import constants as C
from .numerics import (
    check_width,
    expand_groups,
    minmax_params,
    slice_codes_c_scale,
)

# The train-free analogue of the MatQuant objective (Eq. 7): instead of rounding w to the nearest
# c-bit code, pick the code whose slices are jointly best, minimising per weight
#     sum_r lambda_r * (w - alpha * (S(q, r) - z))^2.
# With x = w / alpha + z (the weight on the c-bit scale), L = sum_r lambda_r, A(q) = sum_r lambda_r S(q,r)
# and B(q) = sum_r lambda_r S(q,r)^2, the cost of code q is alpha^2 * (L x^2 - 2 x A(q) + B(q)): a line
# in x per code, so the best code is their lower envelope, a sorted list of breakpoints computed once
# per (c, widths, lambdas). Lookup is exact and costs a table gather, not a search over 2^c codes.

MULTIWIDTH_WIDTHS = (8, 4, 2)
MULTIWIDTH_LAMBDAS = (1.0, 1.0, 1.0)
CALIBRATED_WIDTHS = (8, 5, 4, 3, 2)
"""``--calib``'s default widths: every width a GGUF export serves (Q8_0, Q5_0, Q4_0, Q3_K and int2's
levels). Without 2 (8,5,4,3 before issue 23) GPTQ never looked at the int2 slice and its
compensation made it worse than the data-free int2 (SmolLM2-135M perplexity 33,395 against 9,334)."""


def noise_equal_lambdas(widths) -> tuple[float, ...]:
    """``lambda_r = 4^(r - min r)``: each width's error counted against its own rounding noise
    (which grows 4x per bit dropped), so no width's term swamps the others.

    With all-equal lambdas the narrowest width dominates: on SmolLM2-135M, GPTQ over 8,4,2 with
    lambdas 1,1,1 took int8's KL divergence to the float model from 0.0036 to 0.136; over 8,5,4,3
    with these (1024,16,4,1) int8 stayed at 0.0035 and int4/int5 improved.
    """
    low = min(widths)
    return tuple(float(4 ** (r - low)) for r in widths)


def calibrated_lambdas(widths) -> tuple[float, ...]:
    """``--calib``'s default: :func:`noise_equal_lambdas`, with int2 weighed as int4 where both are
    served (4096,64,16,4,16 for 8,5,4,3,2).

    At int2's noise-equal weight (1 against int8's 4,096) GPTQ's compensation for the wider widths
    left all 30 layers of SmolLM2-135M with an int2 slice worse than the data-free one (KLD 8.11
    against 7.05 on 2,040 held-out tokens). Raised to int4's, int2 went to 5.33, and int3 to int6
    improved too (int4 0.213 to 0.208, int5 0.052 to 0.047); int8 gave back its calibration gain,
    0.0006 to 0.0011, the data-free int8's 0.0010 (docs/results.md)."""
    lam = dict(zip(widths, noise_equal_lambdas(widths), strict=True))
    if 2 in lam and 4 in lam:
        lam[2] = lam[4]
    return tuple(lam[r] for r in widths)
MULTIWIDTH_GRID = (0.6, 0.7, 0.8, 0.9, 1.0, 1.1)
"""Range factors ``multiwidth_params`` tries first (1.0 is plain MinMax, so it never does worse)."""
MULTIWIDTH_REFINE = (0.05, 0.025)
"""Then, per row or group, the best factor plus and minus each of these steps in turn."""


@dataclass(frozen=True)
class _Envelope:
    codes: np.ndarray  # the code of each envelope piece, in order of increasing x
    mean: np.ndarray  # A/L per piece: cost of a piece is L (x - mean)^2 + var (no cancellation)
    var: np.ndarray  # B - A^2/L per piece
    total: float  # L
    x0: float  # bucket table: the cell of x is floor((x - x0) * cells), clipped to the table
    cells: float  # cells per unit of x
    first: np.ndarray  # int32: number of breakpoints below each cell's start
    per_cell: int  # most breakpoints inside one cell
    padded: np.ndarray  # breakpoints (float64) followed by per_cell infinities
    cell_break: np.ndarray  # float64: the one breakpoint inside each cell, or inf (when per_cell <= 1)
    cell_break32: np.ndarray  # the same in float32, for the scale search


def _ep_set(code_bits: int, extra_precision) -> frozenset[int]:
    if extra_precision is True:
        return frozenset(range(1, code_bits))
    if not extra_precision:
        return frozenset()
    return frozenset(int(r) for r in extra_precision if int(r) < code_bits)


@functools.lru_cache(maxsize=64)
def _envelope(
    code_bits: int, widths: tuple[int, ...], lambdas: tuple[float, ...], ep: frozenset[int]
) -> _Envelope:
    if not widths or len(widths) != len(lambdas):
        raise ValueError("widths and lambdas must be non-empty and of equal length")
    if any(not np.isfinite(v) or v < 0 for v in lambdas) or sum(lambdas) <= 0:
        raise ValueError("lambdas must be finite, non-negative, with a positive sum")
    lam: dict[int, float] = {}
    for r, v in zip(widths, lambdas, strict=True):
        check_width(code_bits, r)
        lam[r] = lam.get(r, 0.0) + float(v)
    # Codes that tie on every listed width are told apart by full-width error, with a weight far
    # too small to change any other decision.
    lam[code_bits] = lam.get(code_bits, 0.0) + MULTIWIDTH_TIE * sum(lambdas)
    q = np.arange(1 << code_bits)
    a = np.zeros(q.size)
    b = np.zeros(q.size)
    for r, v in lam.items():
        s = slice_codes_c_scale(q, code_bits, r, r in ep).astype(np.float64)
        a += v * s
        b += v * s * s

    def cross(i: int, j: int) -> float:
        return (b[j] - b[i]) / (2.0 * (a[j] - a[i]))

    hull: list[int] = []
    for j in np.lexsort((b, a)):  # increasing A; among equal A the smallest B comes first and wins
        j = int(j)
        if hull and a[hull[-1]] == a[j]:
            continue
        while len(hull) >= 2 and cross(hull[-2], j) <= cross(hull[-2], hull[-1]):
            hull.pop()
        hull.append(j)
    breaks = np.array([cross(hull[i], hull[i + 1]) for i in range(len(hull) - 1)], dtype=np.float64)
    # Bucket table over [x0, x1): each cell knows how many breakpoints lie below its start. Cells
    # are made fine enough (up to 1/1024) to hold at most one breakpoint, so a lookup is two
    # gathers and a compare instead of a binary search.
    x0 = float(np.floor(breaks[0]) - 1) if breaks.size else 0.0
    x1 = float(np.ceil(breaks[-1]) + 1) if breaks.size else 1.0
    for cells in (4, 16, 64, 256, 1024):
        n_cells = int((x1 - x0) * cells)
        first = np.searchsorted(breaks, x0 + np.arange(n_cells + 1) / cells, "left")
        per_cell = int(np.max(np.diff(first), initial=0))
        if per_cell <= 1:
            break
    first = first[:-1]
    padded = np.concatenate([breaks, np.full(max(per_cell, 1), np.inf)])
    cell_break = padded[first] if per_cell <= 1 else np.empty(0)
    total = float(sum(lam.values()))
    h = np.array(hull)
    return _Envelope(
        codes=h.astype(np.uint8 if code_bits <= 8 else np.uint16),
        mean=(a[h] / total).astype(np.float32),
        var=np.maximum(b[h] - a[h] * a[h] / total, 0.0).astype(np.float32),
        total=total,
        x0=x0,
        cells=float(cells),
        first=first.astype(np.int32),
        per_cell=per_cell,
        padded=padded,
        cell_break=cell_break,
        cell_break32=cell_break.astype(np.float32),
    )


def multiwidth_breakpoints(code_bits, widths, lambdas, extra_precision=()) -> tuple[np.ndarray, np.ndarray]:
    """Breakpoints (float64, increasing) and codes of the multi-width envelope: where its best code
    changes. ``multiwidth_codes(w, a, z, ...) == codes[searchsorted(breaks, x)]`` with
    ``x = float64(float32(w / a)) + z``; for callers (GPTQ on a device) that look codes up themselves."""
    env = _envelope_for(code_bits, widths, lambdas, extra_precision)
    return np.asarray(env.padded[: len(env.codes) - 1], np.float64), np.asarray(env.codes)


MULTIWIDTH_TIE = 1e-6
"""Weight, relative to the lambdas' sum, given to the full code width so ties go to the nearest code."""


def _envelope_for(code_bits, widths, lambdas, extra_precision) -> _Envelope:
    return _envelope(
        int(code_bits),
        tuple(int(r) for r in widths),
        tuple(float(v) for v in lambdas),
        _ep_set(code_bits, extra_precision),
    )


def _c_scale_x(w, scale, zero, group_size, exact: bool = True) -> np.ndarray:
    """x = w / alpha + z. Exact: the float32 quotient as ``quantize`` forms it, z added in float64."""
    w = np.asarray(w, dtype=np.float32)
    cols = w.shape[1]
    a = expand_groups(np.asarray(scale, np.float32), cols, group_size)
    z = expand_groups(np.asarray(zero, np.float32), cols, group_size)
    x = w / a
    if exact:
        x = x.astype(np.float64)
    x += z
    return x


def _envelope_piece(env: _Envelope, x: np.ndarray) -> np.ndarray:
    """Index of the envelope piece holding each x (``searchsorted(breakpoints, x)``, by bucket table).

    float64 x is compared exactly; float32 x against breakpoints rounded to float32.
    """
    cell = x * x.dtype.type(env.cells)
    cell -= x.dtype.type(env.x0 * env.cells)
    np.clip(cell, 0, env.first.size - 1, out=cell)
    ci = cell.astype(np.int32)
    base = env.first.take(ci)
    if env.per_cell <= 1:
        base += x > (env.cell_break if x.dtype == np.float64 else env.cell_break32).take(ci)
        return base
    idx = base.copy()
    for j in range(env.per_cell):
        idx += x > env.padded[base + j]
    return idx


def _group_sums(e: np.ndarray, group_size: int | None) -> np.ndarray:
    rows, cols = e.shape
    g = cols if group_size is None else min(group_size, max(cols, 1))  # no padding past a row
    pad = (-cols) % g
    if pad:
        e = np.pad(e, ((0, 0), (0, pad)))
    return e.reshape(rows, -1, g).sum(axis=2, dtype=np.float64)


def multiwidth_codes(
    w: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    code_bits: int,
    group_size: int | None,
    widths=MULTIWIDTH_WIDTHS,
    lambdas=MULTIWIDTH_LAMBDAS,
    extra_precision=False,
) -> np.ndarray:
    """Codes minimising ``sum_r lambda_r (w - dequantize(S(q, r)))^2`` per weight, exactly.

    ``extra_precision`` (True, or the widths served with it) uses the unclamped slice for those
    widths. With ``widths=(c,)`` this is round-to-nearest (``quantize``) up to exact ties.
    """
    env = _envelope_for(code_bits, widths, lambdas, extra_precision)
    return env.codes[_envelope_piece(env, _c_scale_x(w, scale, zero, group_size))]


def multiwidth_cost(
    w: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    code_bits: int,
    group_size: int | None,
    widths=MULTIWIDTH_WIDTHS,
    lambdas=MULTIWIDTH_LAMBDAS,
    extra_precision=False,
    *,
    exact: bool = True,
) -> tuple[np.ndarray, np.ndarray]:
    """Multi-width codes and their lambda-weighted squared error, summed per row or group.

    ``exact=False`` forms x in float32 (a code may differ where two are within rounding of a tie):
    what the scale search uses, about twice as fast.
    """
    env = _envelope_for(code_bits, widths, lambdas, extra_precision)
    x = _c_scale_x(w, scale, zero, group_size, exact)
    piece = _envelope_piece(env, x)
    d = (x - env.mean.take(piece)).astype(np.float32, copy=False)
    e = np.float32(env.total) * d * d + env.var.take(piece)
    per_group = _group_sums(e, group_size)
    return env.codes[piece], per_group * np.square(np.asarray(scale, np.float64).reshape(per_group.shape))


def multiwidth_params(
    w: np.ndarray,
    code_bits: int = C.DEFAULT_CODE_BITS,
    group_size: int | None = None,
    widths=MULTIWIDTH_WIDTHS,
    lambdas=MULTIWIDTH_LAMBDAS,
    *,
    symmetric: bool = False,
    zero_multiple: int = 1,
    scale_dtype: str = "F16",
    extra_precision=False,
    grid=MULTIWIDTH_GRID,
    refine=MULTIWIDTH_REFINE,
    importance: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per row or group chosen for the multi-width objective.

    Candidates are ``minmax_params`` of the range ``[f * min, f * max]``: f below 1 clips outliers,
    above 1 widens the range so the clamped top slice level reaches the largest weights. Each is
    scored by the cost of its multi-width codes; every factor in ``grid`` is tried, then each row
    or group tries its best factor plus and minus every step of ``refine``. ``1.0`` is always a
    candidate, so the result is never worse on the objective than MinMax.

    ``importance`` (one non-negative number per input column, calibration's ``diag(H)``) weights each
    column's error, ``sum_j importance_j * sum_r lambda_r (w_j - w_hat_rj)^2``, as llama.cpp weights
    its scale search with an importance matrix; None, or equal for every column, is the plain search.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError("quantized tensors are 2-D [rows, cols]")
    rows, cols = w.shape
    imp = _column_importance(importance, cols)
    g = cols if group_size is None else min(group_size, max(cols, 1))  # no padding past a row
    pad = (-cols) % g
    wg = (np.pad(w, ((0, 0), (0, pad)), mode="edge") if pad else w).reshape(rows, -1, g)
    ends = np.stack([np.minimum(wg.min(axis=2), 0.0), np.maximum(wg.max(axis=2), 0.0)], axis=-1)
    shape = ends.shape[:2]
    mw = dict(symmetric=symmetric, zero_multiple=zero_multiple, scale_dtype=scale_dtype)
    if imp is not None:
        weight = np.pad(imp, (0, pad)).reshape(1, -1, g)  # padding columns weigh 0
        col_group = np.arange(cols) // g

    def score(f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, z = minmax_params((ends * f[..., None]).reshape(-1, 2), code_bits, None, **mw)
        a, z = a.reshape(shape), z.reshape(shape)
        if imp is None:
            _, e = multiwidth_cost(w, a, z, code_bits, group_size, widths, lambdas, extra_precision, exact=False)
            return a, z, e
        _, e = multiwidth_cost(
            w, a[:, col_group], z[:, col_group], code_bits, 1, widths, lambdas, extra_precision, exact=False
        )  # per weight: its lambda-weighted squared error
        e = np.pad(e, ((0, 0), (0, pad))).reshape(rows, -1, g)
        return a, z, (e * weight).sum(axis=2)

    return search_range_factors(score, shape, grid, refine)


def _column_importance(importance: np.ndarray | None, cols: int) -> np.ndarray | None:
    """``importance`` as float64 weights clipped at 0, or None where it weighs every column alike."""
    imp = None if importance is None else np.asarray(importance, np.float64).reshape(-1)
    if imp is None or imp.size == 0 or bool(np.all(imp == imp[0])):
        return None
    if imp.size != cols:
        raise ValueError(f"importance has {imp.size} entries for {cols} columns")
    return np.maximum(imp, 0.0)


def search_range_factors(
    score, shape: tuple[int, ...], grid=MULTIWIDTH_GRID, refine=MULTIWIDTH_REFINE
) -> tuple[np.ndarray, np.ndarray]:
    """The search the multi-width scale choices share: ``score(f)`` gives (scale, zero, cost) per
    row or group for range factors ``f``; every factor of ``grid`` is tried, then the best plus and
    minus each ``refine`` step in turn. 1.0 (MinMax) is always a candidate, so the result is never
    worse on the cost than MinMax."""
    best_f = np.ones(shape, np.float32)
    best_a, best_z, best_e = score(best_f)
    tries = [np.full(shape, v, np.float32) for v in sorted(set(map(float, grid)) - {1.0})]
    for step in (None, *refine):
        if step is not None:
            tries = [np.maximum(best_f + np.float32(s), np.float32(0.01)) for s in (-step, step)]
        for f in tries:
            a, z, e = score(f)
            take = e < best_e
            best_f = np.where(take, f, best_f)
            best_a = np.where(take, a, best_a)
            best_z = np.where(take, z, best_z)
            best_e = np.where(take, e, best_e)
    return best_a, best_z
