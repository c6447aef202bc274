"""Per-width block parameters (spec 10.7) fitted to a width's nested codes, as llama.cpp fits a
K-quant block: per sub-group the step and minimum that minimize the importance-weighted squared
error given the codes, then one fp16 ``d`` (and ``dmin``) per 256 columns, integer ``sc`` (and
``mn``), and the minimum re-solved once the step is rounded."""

from __future__ import annotations

import numpy as np

from matq_format import constants as C
from matq_format import numerics as N
from matq_format.widths import WidthParams, WidthSpec

SHAPES: dict[int, WidthSpec] = {
    2: WidthSpec(2, 16, True),
    3: WidthSpec(3, 16, False),
    4: WidthSpec(4, 32, True),
    5: WidthSpec(5, 32, True),
}
"""llama.cpp's K-quant for each width: Q2_K (16, min), Q3_K (16, no min), Q4_K and Q5_K (32, min)."""
MN_MAX: dict[int, int] = {2: 15}
"""Q2_K's sub-block scale and minimum are 4 bits; Q4_K/Q5_K's 6 (``WIDTH_SC_AFFINE``)."""


def spec_for(bits: int, symmetric_grid: bool) -> WidthSpec:
    """The K-quant shape of a width; int3 of an asymmetric grid keeps a minimum (Q3_K has none)."""
    if bits == 3 and not symmetric_grid:
        return WidthSpec(3, 16, True)
    return SHAPES.get(bits, WidthSpec(bits, 32, True))


def fit_tensor(
    w: np.ndarray,
    q: np.ndarray,
    code_bits: int,
    widths: tuple[int, ...],
    symmetric_grid: bool,
    input_axis: int = -1,
    importance: np.ndarray | None = None,
    name: str = "",
) -> dict[int, WidthParams]:
    """Every width of ``widths`` fitted for one tensor (a matrix or a stack, groups along
    ``input_axis``) from its float weights and full codes; the arrays in the tensor's parameter shapes."""
    out = {}
    wm = N.as_matrix(np.asarray(w, np.float32), input_axis)
    qm = N.as_matrix(q, input_axis)
    for r in widths:
        spec = spec_for(r, symmetric_grid)
        try:
            p = fit_width(wm, N.slice_codes(qm, code_bits, r), spec, importance)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
        if q.ndim != 2 or input_axis % q.ndim != q.ndim - 1:
            p = _as_tensor(p, q.shape, input_axis)
        out[r] = p
    return out


def _as_tensor(p: WidthParams, shape: tuple[int, ...], axis: int) -> WidthParams:
    """Matrix-view parameters back in the stack's own parameter shapes (spec 10.5, 10.7)."""
    def back(a, block):
        return None if a is None else N.from_matrix(a, N.param_shape(shape, block, axis), axis)

    g, sb = p.spec.group_size, C.WIDTH_SUPER_BLOCK
    return WidthParams(p.spec, back(p.d, sb), back(p.sc, g), back(p.dmin, sb), back(p.mn, g))


def fit_width(
    w: np.ndarray, k: np.ndarray, spec: WidthSpec, importance: np.ndarray | None = None
) -> WidthParams:
    """Width ``spec.bits``'s parameters for float weights ``w`` and their nested codes ``k`` (both
    ``[rows, cols]``), weighting each column by ``importance`` (``[cols]``, default uniform).
    Raises ValueError when a result is not finite."""
    rows, cols = w.shape
    if not np.all(np.isfinite(w)):
        raise ValueError(f"width {spec.bits}: the refit is not finite (the weights are not)")
    g = spec.group_size
    pad = (-cols) % C.WIDTH_SUPER_BLOCK
    h = np.ones(cols) if importance is None else np.asarray(importance, np.float64)
    h = np.where(np.isfinite(h) & (h > 0), h, 0.0)
    h = (h / max(float(h.max(initial=0)), 1e-30) + 1e-6).astype(np.float32)  # scale-free, none zero
    # float32: sums over 16 or 32 weights lose nothing that the fp16 d and integer sc keep
    wp = np.pad(np.asarray(w, np.float32), ((0, 0), (0, pad))).reshape(rows, -1, g)
    kp = np.pad(k.astype(np.float32), ((0, 0), (0, pad))).reshape(rows, -1, g)
    hp = np.pad(h, (0, pad)).reshape(1, -1, g)
    top = N.code_max(spec.bits)
    if spec.minimum:
        d, sc, dmin, mn = _fit_affine(wp, kp, hp, top, MN_MAX.get(spec.bits, C.WIDTH_SC_AFFINE))
    else:
        d, sc = _fit_symmetric(wp, kp - (1 << (spec.bits - 1)), hp)
        dmin = mn = None
    nsub = -(-cols // g)
    nsup = -(-cols // C.WIDTH_SUPER_BLOCK)
    out = WidthParams(
        spec,
        d[:, :nsup],
        sc[:, :nsub].astype(np.int8),
        None if dmin is None else dmin[:, :nsup],
        None if mn is None else mn[:, :nsub].astype(np.uint8),
    )
    if not np.all(np.isfinite(out.d)) or (out.dmin is not None and not np.all(np.isfinite(out.dmin))):
        raise ValueError(f"width {spec.bits}: the refit is not finite")
    return out


def _per_super(x: np.ndarray, g: int) -> np.ndarray:
    """``[rows, subs]`` as ``[rows, supers, subs per super]``."""
    return x.reshape(x.shape[0], -1, C.WIDTH_SUPER_BLOCK // g)


def _fit_affine(w, k, h, top: int, mmax: int):
    """Least squares ``w ~ step * (k - o) - low`` per sub-group; a falling sub-group (step < 0)
    takes ``o = 2^r - 1`` and a negative ``sc`` (spec 10.7) so its minimum stays a minimum."""
    h = np.broadcast_to(h, w.shape)
    sums = [x.sum(2, dtype=np.float64) for x in (h, h * k, h * k * k, h * k * w, h * w)]
    sw, sk, skk, swk, sww = sums
    det = sw * skk - sk * sk
    with np.errstate(divide="ignore", invalid="ignore"):  # one level used: no slope (step 0)
        step = np.where(det > 1e-9 * sw * skk, (sw * swk - sk * sww) / det, 0.0)
    o = np.where(step < 0, float(top), 0.0)
    g = w.shape[2]
    smax = C.WIDTH_SC_AFFINE if mmax > 15 else 15
    mag = _per_super(np.abs(step), g)
    d = N.fp16_round((mag.max(2) / smax).astype(np.float32)).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, :, None] > 0, np.rint(mag / d[:, :, None]), 0)
    sc = np.clip(sc, 0, smax) * np.where(_per_super(step, g) < 0, -1, 1)
    sc = sc.reshape(step.shape)
    stepq = np.repeat(d, w.shape[1] // d.shape[1], axis=1) * sc
    o = np.where(sc < 0, float(top), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):  # the minimum given the rounded step
        resid = (h * ((stepq[:, :, None] * (k - o[:, :, None])).astype(np.float32) - w)).sum(2, dtype=np.float64)
        low = np.where(sw > 0, resid / sw, 0.0)
    lows = _per_super(low, g)
    big = np.take_along_axis(lows, np.abs(lows).argmax(2)[:, :, None], 2)[:, :, 0]
    dmin = N.fp16_round((big / mmax).astype(np.float32)).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mn = np.where(dmin[:, :, None] != 0, np.rint(lows / dmin[:, :, None]), 0)
    mn = np.clip(mn, 0, mmax).reshape(low.shape)
    return d.astype(np.float32), sc, dmin.astype(np.float32), mn


def _fit_symmetric(w, x, h):
    """Least squares ``w ~ step * x`` per sub-group with ``x = k - 2^(r-1)`` (Q3_K's signed levels)."""
    h = np.broadcast_to(h, w.shape)
    with np.errstate(divide="ignore", invalid="ignore"):
        den = (h * x * x).sum(2, dtype=np.float64)
        step = np.where(den > 0, (h * x * w).sum(2, dtype=np.float64) / den, 0.0)
    g = w.shape[2]
    st = _per_super(step, g)
    big = np.take_along_axis(st, np.abs(st).argmax(2)[:, :, None], 2)[:, :, 0]
    d = N.fp16_round((np.abs(big) / (C.WIDTH_SC_SYMMETRIC - 1)).astype(np.float32)).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, :, None] > 0, np.rint(st / d[:, :, None]), 0)
    sc = np.clip(sc, -C.WIDTH_SC_SYMMETRIC, C.WIDTH_SC_SYMMETRIC - 1).reshape(step.shape)
    return d.astype(np.float32), sc
