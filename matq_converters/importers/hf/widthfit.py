"""Per-width block parameters (spec 10.7) fitted to a width's nested codes, as llama.cpp fits a
block: per sub-group the step and minimum that minimize the importance-weighted squared error given
the codes, then one fp16 ``d`` (and ``dmin``) per super-block, integer ``sc`` (and ``mn``), and the
minimum re-solved once the step is rounded. Rows of 256-multiples take the K-quant shape; other rows
(SmolLM2's 576) the block shape (one ``d`` per group: Q2_0, Q4_0, Q5_0). All sub-groups at once."""

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
BLOCK_SHAPES: dict[int, WidthSpec] = {
    2: WidthSpec(2, 64, False, 64),
    3: WidthSpec(3, 32, False, 32),
    4: WidthSpec(4, 32, False, 32),
    5: WidthSpec(5, 32, False, 32),
}
"""One ``d`` per group, no minimum: Q2_0 (2.25 bits), Q4_0 holding int3 and int4 (4.5), Q5_0 (5.5),
no bigger than the width's K-quant (Q4_1/Q5_1 would hold a minimum at 5 and 6 bits)."""
MN_MAX: dict[int, int] = {2: 15}
"""Q2_K's sub-block scale and minimum are 4 bits; Q4_K/Q5_K's 6 (``WIDTH_SC_AFFINE``)."""


def spec_for(bits: int, symmetric_grid: bool, cols: int = C.WIDTH_SUPER_BLOCK) -> WidthSpec:
    """The shape of a width for rows of ``cols``: its K-quant where 256 divides them (int3 of an
    asymmetric grid keeps a minimum: Q3_K has none), else its block shape."""
    if cols % C.WIDTH_SUPER_BLOCK:
        return BLOCK_SHAPES.get(bits, WidthSpec(bits, 32, False, 32))
    if bits == 3 and not symmetric_grid:
        return WidthSpec(3, 16, True)
    return SHAPES.get(bits, WidthSpec(bits, 32, True))


def candidates(bits: int, symmetric_grid: bool, cols: int) -> tuple[WidthSpec, ...]:
    """Shapes the fit tries, biggest first: int2 on 256-multiples also tries Q2_0 (smaller)."""
    first = spec_for(bits, symmetric_grid, cols)
    return (first, BLOCK_SHAPES[2]) if bits == 2 and not cols % C.WIDTH_SUPER_BLOCK else (first,)


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
    ``input_axis``) from its float weights and full codes; the arrays in the tensor's parameter
    shapes. Where two shapes fit, the smaller one wins at equal or lower weighted error."""
    out = {}
    wm = N.as_matrix(np.asarray(w, np.float32), input_axis)
    qm = N.as_matrix(q, input_axis)
    if not np.all(np.isfinite(wm)):
        raise ValueError(f"{name}: width {min(widths)}: the refit is not finite (the weights are not)")
    h = _importance(importance, wm.shape[1])
    for r in widths:
        k = N.slice_codes(qm, code_bits, r)
        best, least = None, np.inf
        for spec in candidates(r, symmetric_grid, wm.shape[1]):
            try:
                p, err = _fit(wm, k, spec, h)
            except ValueError as exc:
                raise ValueError(f"{name}: {exc}") from None
            if best is None or err <= least:
                best, least = p, err
        if q.ndim != 2 or input_axis % q.ndim != q.ndim - 1:
            best = _as_tensor(best, q.shape, input_axis)
        out[r] = best
    return out


def weighted_error(w: np.ndarray, k: np.ndarray, p: WidthParams, h: np.ndarray) -> float:
    """Importance-weighted squared error of a width's values: what the shape choice compares."""
    v = p.dequantize(k)
    return float(np.dot(np.square(v - w, dtype=np.float32).sum(0, dtype=np.float64), h))


def _as_tensor(p: WidthParams, shape: tuple[int, ...], axis: int) -> WidthParams:
    """Matrix-view parameters back in the stack's own parameter shapes (spec 10.5, 10.7)."""
    def back(a, block):
        return None if a is None else N.from_matrix(a, N.param_shape(shape, block, axis), axis)

    g, sb = p.spec.group_size, p.spec.super_block
    return WidthParams(p.spec, back(p.d, sb), back(p.sc, g), back(p.dmin, sb), back(p.mn, g))


def _importance(importance: np.ndarray | None, cols: int) -> np.ndarray:
    """Column weights scaled to a largest of 1, none zero (the fit is scale-free), float32."""
    h = np.ones(cols) if importance is None else np.asarray(importance, np.float64)
    h = np.where(np.isfinite(h) & (h > 0), h, 0.0)
    return (h / max(float(h.max(initial=0)), 1e-30) + 1e-6).astype(np.float32)


def fit_width(
    w: np.ndarray, k: np.ndarray, spec: WidthSpec, importance: np.ndarray | None = None, prepared: bool = False
) -> WidthParams:
    """Width ``spec.bits``'s parameters for float weights ``w`` and their nested codes ``k`` (both
    ``[rows, cols]``), weighting each column by ``importance`` (``[cols]``, default uniform;
    ``prepared``: already scaled by ``_importance``). Raises ValueError when a result is not finite."""
    if not prepared and not np.all(np.isfinite(w)):
        raise ValueError(f"width {spec.bits}: the refit is not finite (the weights are not)")
    return _fit(w, k, spec, importance if prepared else _importance(importance, w.shape[1]))[0]


def _fit(w: np.ndarray, k: np.ndarray, spec: WidthSpec, h: np.ndarray) -> tuple[WidthParams, float]:
    """:func:`fit_width` with scaled importance ``h``, and the weighted squared error of the result,
    from the same per-sub-group sums (what :func:`weighted_error` computes from the values, without
    decoding them)."""
    rows, cols = w.shape
    g, sb = spec.group_size, spec.super_block
    pad = (-cols) % sb
    wp, kp, hp = np.asarray(w, np.float32), k.astype(np.float32), h
    if pad:
        wp, kp, hp = np.pad(wp, ((0, 0), (0, pad))), np.pad(kp, ((0, 0), (0, pad))), np.pad(hp, (0, pad))
    wp, kp, hp = wp.reshape(rows, -1, g), kp.reshape(rows, -1, g), hp.reshape(-1, g)
    sums = _sums(wp, kp, hp)
    top = N.code_max(spec.bits)
    per = sb // g
    if spec.minimum:
        smax = 1 if per == 1 else (C.WIDTH_SC_AFFINE if MN_MAX.get(spec.bits, 64) > 15 else 15)
        mmax = 1 if per == 1 else MN_MAX.get(spec.bits, C.WIDTH_SC_AFFINE)
        d, sc, dmin, mn = _fit_affine(sums, top, per, smax, mmax)
        low = np.repeat(dmin.astype(np.float64), per, axis=1) * mn
    else:
        d, sc = _fit_symmetric(sums, 1 << (spec.bits - 1), per)
        dmin = mn = None
        low = 0.0
    step = np.repeat(d.astype(np.float64), per, axis=1) * sc
    err = _error(sums, step, N.width_offset(sc, spec.bits, not spec.minimum), low)
    nsub, nsup = -(-cols // g), -(-cols // sb)
    out = WidthParams(
        spec,
        d[:, :nsup],
        sc[:, :nsub].astype(np.int8),
        None if dmin is None else dmin[:, :nsup],
        None if mn is None else mn[:, :nsub].astype(np.uint8),
    )
    if not np.all(np.isfinite(out.d)) or (out.dmin is not None and not np.all(np.isfinite(out.dmin))):
        raise ValueError(f"width {spec.bits}: the refit is not finite")
    return out, err


def _error(sums, step: np.ndarray, o: np.ndarray, low) -> float:
    """``sum h (step*(k - o) - low - w)^2`` over every sub-group, expanded in the sums."""
    sw, sk, skk, swk, sww, sww2 = sums
    k1 = sk - o * sw
    k2 = skk - 2 * o * sk + o * o * sw
    kw = swk - o * sww
    e = step * step * k2 - 2 * step * kw + sww2 + low * (low * sw - 2 * step * k1 + 2 * sww)
    return float(np.maximum(e, 0.0).sum())


def _sums(w, k, h):
    """Per row and sub-group (float32 over each group, float64 after): sum h, h*k, h*k^2, h*k*w, h*w,
    h*w^2."""
    hw = w * h
    sw = h.sum(1, dtype=np.float64)[None, :]
    sk = np.einsum("rgj,gj->rg", k, h).astype(np.float64)
    skk = np.einsum("rgj,gj->rg", k * k, h).astype(np.float64)
    swk = np.einsum("rgj,rgj->rg", k, hw).astype(np.float64)
    sww = hw.sum(2, dtype=np.float32).astype(np.float64)
    sww2 = np.einsum("rgj,rgj->rg", w, hw).astype(np.float64)
    return sw, sk, skk, swk, sww, sww2


def _per_super(x: np.ndarray, per: int) -> np.ndarray:
    """``[rows, subs]`` as ``[rows, supers, subs per super]``."""
    return x.reshape(x.shape[0], -1, per)


def _fit_affine(sums, top: int, per: int, smax: int, mmax: int):
    """Least squares ``w ~ step * (k - o) - low`` per sub-group; a falling sub-group (step < 0)
    takes ``o = 2^r - 1`` and a negative ``sc`` (spec 10.7) so its minimum stays a minimum."""
    sw, sk, skk, swk, sww, _ = sums
    det = sw * skk - sk * sk
    with np.errstate(divide="ignore", invalid="ignore"):  # one level used: no slope (step 0)
        step = np.where(det > 1e-9 * sw * skk, (sw * swk - sk * sww) / det, 0.0)
    mag = _per_super(np.abs(step), per)
    d = N.fp16_round((mag.max(2) / smax).astype(np.float32)).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, :, None] > 0, np.rint(mag / d[:, :, None]), 0)
    sc = (np.clip(sc, 0, smax) * np.where(_per_super(step, per) < 0, -1, 1)).reshape(step.shape)
    stepq = np.repeat(d, per, axis=1) * sc
    o = np.where(sc < 0, float(top), 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):  # the minimum given the rounded step
        low = np.where(sw > 0, (stepq * (sk - o * sw) - sww) / sw, 0.0)
    lows = _per_super(low, per)
    big = np.take_along_axis(lows, np.abs(lows).argmax(2)[:, :, None], 2)[:, :, 0]
    dmin = N.fp16_round((big / mmax).astype(np.float32)).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        mn = np.where(dmin[:, :, None] != 0, np.rint(lows / dmin[:, :, None]), 0)
    mn = np.clip(mn, 0, mmax).reshape(low.shape)
    return d.astype(np.float32), sc, dmin.astype(np.float32), mn


def _fit_symmetric(sums, o: int, per: int):
    """Least squares ``w ~ step * (k - o)`` per sub-group (Q3_K's and Q2_0/Q4_0's signed levels);
    one sub-group per super-block stores ``d = |step|`` and ``sc`` its sign."""
    sw, sk, skk, swk, sww, _ = sums
    with np.errstate(divide="ignore", invalid="ignore"):
        den = skk - 2 * o * sk + o * o * sw
        step = np.where(den > 0, (swk - o * sww) / den, 0.0)
    lo, hi = (-1, 1) if per == 1 else (-C.WIDTH_SC_SYMMETRIC, C.WIDTH_SC_SYMMETRIC - 1)
    st = _per_super(step, per)
    big = np.take_along_axis(st, np.abs(st).argmax(2)[:, :, None], 2)[:, :, 0]
    d = N.fp16_round((np.abs(big) / hi).astype(np.float32)).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, :, None] > 0, np.rint(st / d[:, :, None]), 0)
    return d.astype(np.float32), np.clip(sc, lo, hi).reshape(step.shape)
