"""Encode a MatQuant slice as a ggml block type exactly: integer levels in, no float re-quantization.

A width-r slice ``w = alpha * (k * 2^s - z)`` already sits on an integer grid. Each ggml type below
takes those integers as its levels and its block parameters from :mod:`.params` (which also
defines their fp16 rounding); this module only checks which types can hold a grid and packs
the bytes in ggml's layout (``gguf.quants`` decodes them). Types are tried smallest first, each
judged from the slice's per-group parameters (:class:`Fit`); only the one chosen touches the
per-weight codes.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np
from gguf import GGML_QUANT_SIZES
from gguf import GGMLQuantizationType as T

from matq_converters.exporters.gguf import ggml
from matq_converters.exporters.gguf import params as G
from matq_format import numerics as N
from matq_format.widths import WidthParams

QK_K = 256
ORDER: tuple[T, ...] = (
    T.Q2_K, T.Q3_K, T.Q4_K, T.Q4_0, T.Q4_1, T.Q5_K, T.Q5_0, T.Q5_1, T.Q6_K, T.Q8_0, T.F16, T.F32
)
"""Every type the exporter writes, smallest first (bits per weight 2.625 ... 32)."""

# unsigned level capacity of the types with a stored minimum, and the largest sub-block multiplier
_AFFINE = {T.Q4_1: 15, T.Q5_1: 31}
_KQUANT = {T.Q2_K: (3, 15), T.Q4_K: (15, 63), T.Q5_K: (31, 63)}
# signed level range of the offset-free types, and the largest sub-block multiplier (None: no sub-blocks)
_SIGNED = {T.Q8_0: (-128, 127, None), T.Q5_0: (-16, 15, None), T.Q4_0: (-8, 7, None), T.Q3_K: (-4, 3, 31), T.Q6_K: (-32, 31, 127)}


def bits_per_weight(qtype: T) -> float:
    block, size = GGML_QUANT_SIZES[qtype]
    return 8.0 * size / block


@dataclass(frozen=True)
class Slice:
    """One tensor at one width: r-bit codes and per-group parameters, rows already in GGUF order."""

    k: np.ndarray
    scale: np.ndarray
    zero: np.ndarray
    code_bits: int
    bits: int
    group_size: int | None
    extra_precision: bool = False
    width: WidthParams | None = None
    """The width's own block parameters (spec 10.7), rows in the same order as ``k``; None: the shared grid."""

    @property
    def max_level(self) -> int:
        """Largest code of the grid: ``2^r - 1``, or ``2^r`` with the extra-precision bucket."""
        top = N.code_max(self.bits)
        return top + 1 if self.extra_precision and self.bits < self.code_bits else top

    def dequantize(self) -> np.ndarray:
        p = self.width
        if p is not None:
            return p.dequantize(self.k)
        return N.dequantize_codes(self.k, self.scale, self.zero, self.code_bits, self.bits, self.group_size)


def checkpoint_slice(ckpt, name: str, bits: int, extra_precision: bool) -> Slice:
    """A checkpoint tensor at one width; a stack of matrices (spec 10.5) as one matrix of its rows
    along the input axis, the only rows along which a GGUF block can keep its grid."""
    t = ckpt.info(name)
    k, a, z = ckpt.sliced_codes(name, bits, extra_precision), ckpt.scale(name), ckpt.zero(name)
    k, a, z = (np.ascontiguousarray(N.as_matrix(x, t.in_axis)) for x in (k, a, z))
    own = None if extra_precision or bits >= ckpt.code_bits else ckpt.width_params(name, bits)
    if own is not None and t.stacked:  # its parameters folded into the same rows (spec 10.7 on 10.5)
        own = replace(own, **{f: None if v is None else np.ascontiguousarray(N.as_matrix(v, t.in_axis))
                              for f, v in (("d", own.d), ("sc", own.sc), ("dmin", own.dmin), ("mn", own.mn))})
    return Slice(k, a, z, ckpt.code_bits, bits, t.group_size, extra_precision, own)


def stack(slices: list[Slice], order: np.ndarray | None = None) -> Slice:
    """Slices of one width that llama.cpp's converter writes as one GGUF tensor (per-expert matrices
    stacked): their rows one after another, then taken in ``order`` (the converter's row order) if
    given. Their own width parameters (spec 10.7) are kept only where every slice has them, alike."""
    s0 = slices[0]
    if len({(s.code_bits, s.bits, s.group_size, s.extra_precision) for s in slices}) > 1:
        raise ValueError("slices stacked into one tensor differ in code bits, width, group size or extra precision")

    def rows(arrays: list[np.ndarray]) -> np.ndarray:
        cat = np.concatenate(arrays) if len(arrays) > 1 else arrays[0]
        return cat if order is None else cat[order]

    k, a, z = (rows([getattr(s, f) for s in slices]) for f in ("k", "scale", "zero"))
    own = [s.width for s in slices]
    if any(o is None for o in own) or len({o.spec for o in own}) != 1:
        return Slice(k, a, z, s0.code_bits, s0.bits, s0.group_size, s0.extra_precision)
    fields = {f: None if getattr(own[0], f) is None else rows([getattr(o, f) for o in own]) for f in ("d", "sc", "dmin", "mn")}
    return Slice(k, a, z, s0.code_bits, s0.bits, s0.group_size, s0.extra_precision, replace(own[0], **fields))


@dataclass(frozen=True)
class Encoded:
    qtype: T
    data: np.ndarray
    """uint8 ``[rows, bytes per row]`` for block types, float16/float32 ``[rows, cols]`` otherwise."""
    exact: bool
    """Decodes bit-identically to ``numerics.dequantize_codes`` (F16/F32 are chosen only when exact)."""
    levels: tuple | None = field(default=None, compare=False, repr=False)
    """``(levels, step, low)`` that ggml decodes ``data`` to (:func:`decode`), kept from packing."""


@dataclass(frozen=True)
class Fit:
    """A type that holds a slice's grid, and whether exactly: decided from the per-group parameters
    alone, so that trying a type costs little; ``make`` packs the bytes (for the type chosen)."""

    qtype: T
    exact: bool
    make: Callable[[], Encoded]


def fits_layout(qtype: T, cols: int, group_size: int | None) -> bool:
    """Blocks must tile each row and each block must lie in one quantization group."""
    if qtype in (T.F16, T.F32):
        return True
    block = GGML_QUANT_SIZES[qtype][0]
    return cols % block == 0 and (group_size is None or group_size % block == 0)


def encode(sl: Slice, allowed: tuple[T, ...] | None = None) -> Encoded:
    """The smallest type of ``allowed`` (default: all) that holds the slice's grid: its levels, with
    block parameters exact or one fp16 rounding away (``Encoded.exact`` tells); F32 always does."""
    if sl.width is not None:
        enc = encode_width(sl)
        if enc is not None and (allowed is None or enc.qtype in allowed):
            return enc
        return _refit_width(sl, allowed)
    for qtype in ORDER:
        if allowed is not None and qtype not in allowed and qtype != T.F32:
            continue
        enc = encode_as(sl, qtype)
        if enc is not None:
            return enc
    raise AssertionError("F32 always holds a slice")  # pragma: no cover


# --- compact files: the type llama.cpp would use for a width, exact where the grid allows ----------
COMPACT: dict[int, T] = {1: T.Q2_K, 2: T.Q2_K, 3: T.Q3_K, 4: T.Q4_K, 5: T.Q5_K, 6: T.Q6_K, 7: T.Q8_0, 8: T.Q8_0}
"""llama.cpp's base type for a width (its Q2_K ... Q8_0 file types)."""
SUB_BLOCK: dict[T, int] = {T.Q2_K: 16, T.Q3_K: 16, T.Q4_K: 32, T.Q5_K: 32, T.Q6_K: 16}
"""Weights per sub-block (one integer scale, and minimum where there is one) of the K types."""
ROW_FALLBACK: dict[T, T] = {T.Q2_K: T.Q4_1, T.Q3_K: T.Q4_1, T.Q4_K: T.Q4_1, T.Q5_K: T.Q5_1, T.Q6_K: T.Q8_0}
"""For rows that are not a multiple of 256 (hidden sizes like 576): the smallest block-32 type that
holds an affine grid of the width (llama.cpp falls back to IQ4_NL, Q5_0, Q5_1 and Q8_0 there)."""


LEVELS_OVER_SIZE = 5
"""Up to this width, a grid the compact type cannot hold (an asymmetric int3 in the offset-free
Q3_K) goes one type up with its levels kept (Q4_K, 4.5 instead of 3.44 bits per weight): re-fitting
the values would move them by up to half a step, which on SmolLM2-135M took int3 from perplexity
240 (the slice, in transformers) to 5051. Wider grids (int6, int8) are re-fitted: their steps are
small and Q8_0's 8.5 bits would double int6's size."""


def compact_type(bits: int, cols: int) -> T:
    """The type a width-``bits`` grid (count the extra bucket as one bit more) is written in."""
    qtype = COMPACT[min(max(bits, 1), 8)]
    if cols % GGML_QUANT_SIZES[qtype][0]:
        qtype = ROW_FALLBACK.get(qtype, qtype)
    return qtype if cols % GGML_QUANT_SIZES[qtype][0] == 0 else T.F16


def encode_compact(sl: Slice) -> Encoded:
    """The smallest exact type no bigger than the width's compact type; else that type, re-fitted.

    A re-fit keeps the slice's integer levels where the type holds them (only block parameters are
    rounded), and otherwise quantizes the slice's values into the type: an asymmetric grid has no
    place in the offset-free Q8_0 and Q6_K, so its int8 and int6 slices move by up to half a
    (small) step there; narrower grids go one type up instead (see ``LEVELS_OVER_SIZE``).
    Symmetric checkpoints with nested scales are exact at every width. Either way the result says
    whether it is exact, and :func:`rel_rms_error` tells by how much it is not.
    """
    if sl.width is not None:
        return encode_width(sl) or refit(sl.dequantize(), compact_type(sl.bits, sl.k.shape[1]))
    bits = sl.bits + (1 if sl.max_level > N.code_max(sl.bits) else 0)
    target = compact_type(bits, sl.k.shape[1])
    budget = bits_per_weight(target)
    candidates = [t for t in ORDER if t not in (T.F16, T.F32)]
    for qtype in candidates:
        if bits_per_weight(qtype) > budget:
            break
        fit = fit_as(sl, qtype) or fit_nested(sl, qtype)
        if fit is not None and fit.exact:
            return fit.make()
    # not exact: the same levels with rounded parameters where the type holds them, else the values
    if target in (T.F16, T.F32):
        return refit(sl.dequantize(), target)
    fit = fit_as(sl, target) or fit_nested(sl, target)
    if fit is None and bits <= LEVELS_OVER_SIZE:  # keep the levels one type up rather than move them
        for qtype in candidates[candidates.index(target) + 1 :]:
            fit = fit_as(sl, qtype) or fit_nested(sl, qtype)
            if fit is not None:
                break
    return fit.make() if fit is not None else refit(sl.dequantize(), target)


# --- a width's own block parameters (spec 10.7) as the ggml type of its shape, exactly -------------
_WIDTH_K = {(2, 16, True): T.Q2_K, (4, 32, True): T.Q4_K, (5, 32, True): T.Q5_K, (3, 16, False): T.Q3_K}
"""K-quant shapes (super-blocks of 256): width, sub-group, minimum."""
_WIDTH_BLOCK = {(2, 64, False): T.Q2_0, (3, 32, False): T.Q4_0, (4, 32, False): T.Q4_0, (5, 32, False): T.Q5_0}
"""Block shapes (one ``d`` per group, ``sc`` a sign) without a minimum; with one, groups of 32 of
widths 2 to 4 are Q4_1 and of width 5 Q5_1."""


def width_type(sl: Slice) -> T | None:
    """The ggml type that holds a slice's own block parameters exactly, or None: Q2_K, Q3_K, Q4_K,
    Q5_K for the K-quant shapes (:data:`_WIDTH_K`), Q2_0, Q4_0, Q5_0, Q4_1, Q5_1 for the block shapes."""
    p = sl.width
    if p is None or sl.extra_precision or sl.k.shape[-1] % p.spec.super_block:
        return None
    shape = (sl.bits, p.spec.group_size, p.spec.minimum)
    if p.spec.super_block == p.spec.group_size:
        if p.spec.minimum:
            return {2: T.Q4_1, 3: T.Q4_1, 4: T.Q4_1, 5: T.Q5_1}.get(sl.bits) if p.spec.group_size == 32 else None
        return _WIDTH_BLOCK.get(shape)
    qtype = _WIDTH_K.get(shape) if p.spec.super_block == QK_K else None
    if qtype == T.Q2_K and (np.abs(p.sc.astype(np.int32)).max(initial=0) > 15 or p.mn.max(initial=0) > 15):
        return None  # Q2_K's sub-block integers have 4 bits
    return qtype


def encode_width(sl: Slice) -> Encoded | None:
    """A slice with its own parameters as its ggml type (:func:`width_type`), decoding to
    ``numerics.dequantize_width``. K-quants: ``d*|sc|`` and ``dmin*mn`` are exact products as ggml
    forms them, a negative ``sc`` stores the reversed level ``2^r - 1 - k``, so ggml's
    ``dl*level - ml`` is the same two roundings (bit for bit). Block types: see :func:`_encode_block`.
    None when no type holds it."""
    qtype = width_type(sl)
    if qtype is None:
        return None
    if sl.width.spec.super_block == sl.width.spec.group_size:
        return _encode_block(sl, qtype)
    p, rows = sl.width, sl.k.shape[0]
    g = p.spec.group_size
    sc = p.sc.astype(np.int32)
    sc_el = np.repeat(sc, g, axis=1)
    d = p.d.reshape(-1)
    if qtype == T.Q3_K:
        lv = _blocks(sl.k.astype(np.int32) - 4, QK_K)
        data = _pack_q3_k(lv, d, sc.reshape(-1, QK_K // g))
        return Encoded(qtype, data.reshape(rows, -1), True)
    top = N.code_max(sl.bits)
    lv = _blocks(np.where(sc_el < 0, top - sl.k.astype(np.int32), sl.k.astype(np.int32)), QK_K)
    mag, mn = np.abs(sc).reshape(-1, QK_K // g), p.mn.astype(np.int32).reshape(-1, QK_K // g)
    dmin = p.dmin.reshape(-1)
    pack = {T.Q2_K: _pack_q2_k, T.Q4_K: _pack_q4_k, T.Q5_K: _pack_q5_k}[qtype]
    return Encoded(qtype, pack(lv, d, dmin, mag, mn).reshape(rows, -1), True)


def _encode_block(sl: Slice, qtype: T) -> Encoded:
    """One ``d`` per group. Q4_0/Q5_0 (``d'*(q - z)``): ``d' = d*sc``, ``q = k - o + z``, bit for bit.
    Q4_1/Q5_1 (``d'*q + m``): ``m = -dmin*mn``, a negative ``sc`` the reversed level, bit for bit
    (``t + (-low)`` is ``t - low``). Q2_0 (``d'*(q - 1)``) puts its zero on level 1 of 0..3, the
    nested int2 codes on 2: ``q = 3 - k``, ``d' = -d*sc``, equal values, though a zero level is
    ``-0.0`` where the spec's is ``+0.0`` (or the reverse); a group whose step is 0 keeps the sign."""
    p, rows = sl.width, sl.k.shape[0]
    g = p.spec.group_size
    k = sl.k.astype(np.int32)
    step = (p.d.astype(np.float32) * p.sc.astype(np.float32)).reshape(-1)
    if qtype == T.Q2_0:
        kb = _blocks(k, g)
        lv = np.where((step == 0)[:, None], np.maximum(kb - 1, 0), 3 - kb)
        return Encoded(qtype, _pack_q2_0(lv, np.where(step == 0, np.float32(0), -step)).reshape(rows, -1), True)
    if not p.spec.minimum:
        lv = _blocks(k - (1 << (sl.bits - 1)), g)
        return Encoded(qtype, _BLOCK32[qtype](lv, step).reshape(rows, -1), True)
    top = N.code_max(sl.bits)
    lv = _blocks(np.where(np.repeat(p.sc, g, axis=1) < 0, top - k, k), g)
    m = -(p.dmin.astype(np.float32) * p.mn.astype(np.float32)).reshape(-1)
    pack = _pack_q4_1 if qtype == T.Q4_1 else _pack_q5_1
    return Encoded(qtype, pack(lv, np.abs(step), m).reshape(rows, -1), True)


def _refit_width(sl: Slice, allowed: tuple[T, ...] | None) -> Encoded:
    """A width's own values in the smallest allowed type that holds them exactly, else F32."""
    w = sl.dequantize()
    with np.errstate(over="ignore"):
        h = w.astype(np.float16)
    if (allowed is None or T.F16 in allowed) and np.array_equal(h.astype(np.float32), w):
        return Encoded(T.F16, h, True)
    return Encoded(T.F32, w, True)


def refit(w: np.ndarray, qtype: T) -> Encoded:
    """Float weights ``[rows, cols]`` quantized into ``qtype`` (dense tensors, and slices whose levels
    the type cannot hold): gguf-py's quantizers for the 32-blocks, sub-block max scaling for the
    offset-free K types, nearest fp16 for F16."""
    import gguf

    w = np.ascontiguousarray(w, np.float32)
    if qtype == T.F32:
        return Encoded(qtype, w, False)
    if qtype == T.F16:
        return Encoded(qtype, w.astype(np.float16), False)
    if qtype in _SIGNED and _SIGNED[qtype][2] is not None:
        return Encoded(qtype, _refit_signed_k(w, qtype), False)
    if qtype in (T.Q2_K, T.Q4_K, T.Q5_K):  # no float quantizer here: the next offset-free type up
        return refit(w, T.Q6_K if w.shape[1] % QK_K == 0 else T.Q8_0)
    if qtype in _GGML_SAME and ggml.available():
        return Encoded(qtype, ggml.quantize(w, qtype), False)
    return Encoded(qtype, gguf.quants.quantize(w, qtype), False)


_GGML_SAME = frozenset((T.Q4_0, T.Q4_1, T.Q5_0, T.Q5_1, T.Q8_0))
"""The types gguf-py quantizes as ggml's reference code does, bit for bit: ggml may do it, faster."""


def _refit_signed_k(w: np.ndarray, qtype: T) -> np.ndarray:
    """Q3_K/Q6_K from floats: per 16-weight sub-block the scale that maps its largest magnitude to
    the top level, stored as an integer multiple of one fp16 scale per super-block."""
    lo, hi, max_mult = _SIGNED[qtype]
    rows = w.shape[0]
    x = w.reshape(-1, QK_K // 16, 16).astype(np.float64)
    sub = np.abs(x).max(axis=2) / -lo  # scale per sub-block: the largest magnitude at the end level
    d = N.fp16_round((sub.max(axis=1) / max_mult).astype(np.float32)).astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        sc = np.where(d[:, None] > 0, np.clip(np.rint(sub / d[:, None]), 0, max_mult), 0)
        step = (d[:, None] * sc)[:, :, None]
        lv = np.where(step > 0, np.clip(np.rint(x / step), lo, hi), 0).astype(np.int32)
    lv = lv.reshape(-1, QK_K)
    pack = _pack_q3_k if qtype == T.Q3_K else _pack_q6_k
    return pack(lv, d.astype(np.float32), sc.astype(np.int32)).reshape(rows, -1)


def decode(enc: Encoded) -> np.ndarray:
    """What ggml's decoder returns for an encoding (gguf-py's reference dequantizers); for one packed
    here, the same float32 operations on its levels, without unpacking the bytes."""
    import gguf

    if enc.qtype in (T.F16, T.F32):
        return np.asarray(enc.data, np.float32)
    if enc.levels is not None:
        return _decode_levels(*enc.levels).reshape(enc.data.shape[0], -1)
    if enc.qtype == T.Q2_0:
        return decode_q2_0(enc.data)
    return gguf.quants.dequantize(enc.data, enc.qtype)


def decode_q2_0(data: np.ndarray) -> np.ndarray:
    """ggml's ``dequantize_row_q2_0`` (``(q - 1) * d`` in float32), which the pinned gguf-py lacks."""
    rows = data.shape[0]
    b = np.asarray(data, np.uint8).reshape(-1, 18)
    d = b[:, :2].copy().view("<f2").astype(np.float32)
    q = (b[:, 2:, None] >> np.array([0, 2, 4, 6], np.uint8)) & 3
    return ((q.reshape(-1, 64).astype(np.int32) - 1).astype(np.float32) * d).reshape(rows, -1)


def _decode_levels(levels: np.ndarray, step: np.ndarray, low: np.ndarray | None) -> np.ndarray:
    """ggml's decode ``step * level - low`` (float32; ``+ m`` is ``- (-m)``), one step and low per run
    of ``levels.size // step.size`` weights."""
    x = levels.reshape(step.size, -1).astype(np.float32)
    x *= step.reshape(-1, 1)
    if low is not None:
        x -= low.reshape(-1, 1)
    return x


def rel_rms_error(enc: Encoded, target: np.ndarray) -> float:
    """sqrt(sum (decoded - target)^2 / sum target^2): how far an inexact encoding is from its slice."""
    t = np.asarray(target, np.float32)
    sq = np.subtract(decode(enc), t, dtype=np.float64)  # float64 throughout, one array at a time
    num = float(np.sum(np.square(sq, out=sq)))
    den = float(np.sum(np.square(t, out=sq, dtype=np.float64)))
    return float(np.sqrt(num / den)) if den else float(np.sqrt(num))


def encode_as(sl: Slice, qtype: T) -> Encoded | None:
    """Encode as ``qtype``, or None when that type cannot hold this grid (levels, layout, fp16 range)."""
    if not fits_layout(qtype, sl.k.shape[1], sl.group_size):
        return None
    if qtype not in (T.F16, T.F32):
        fit = fit_as(sl, qtype)
        return None if fit is None else fit.make()
    w = sl.dequantize()
    if qtype == T.F32:
        return Encoded(T.F32, w, True)
    with np.errstate(over="ignore"):
        h = w.astype(np.float16)
    return Encoded(T.F16, h, True) if np.array_equal(h.astype(np.float32), w) else None


def fit_as(sl: Slice, qtype: T) -> Fit | None:
    """Whether (and how exactly) block type ``qtype`` holds the slice's grid, its bytes not yet packed;
    None when it cannot (levels, layout, fp16 range)."""
    if qtype in (T.F16, T.F32) or not fits_layout(qtype, sl.k.shape[1], sl.group_size):
        return None
    if qtype in _AFFINE:
        return _affine(sl, qtype)
    if qtype in _KQUANT:
        return _kquant(sl, qtype)
    return _signed(sl, qtype)


def encode_nested(sl: Slice, qtype: T) -> Encoded | None:
    """:func:`fit_nested`, packed."""
    fit = fit_nested(sl, qtype)
    return None if fit is None else fit.make()


def fit_nested(sl: Slice, qtype: T) -> Fit | None:
    """A K type for a slice whose groups are smaller than its 256-weight super-blocks: each sub-block
    (16 or 32 weights, inside one group) takes its group's step and minimum, stored as integer
    multiples of one fp16 value per super-block (``ggml_params.fp16_times_ints``). Exact where the
    groups' parameters are such multiples; else each is rounded to the nearest."""
    rows, cols = sl.k.shape
    sub = SUB_BLOCK.get(qtype)
    if sub is None or cols % QK_K or (sl.group_size is not None and sl.group_size % sub):
        return None
    if qtype in _KQUANT:
        top, max_mult = _KQUANT[qtype]
        if sl.max_level > top or np.any(sl.scale < 0):  # unsigned sub-block scales and minimums
            return None
        step = sl.scale * np.float32(1 << (sl.code_bits - sl.bits))
        low = sl.scale * sl.zero
        per = lambda p: _per_block(p, cols, sl.group_size, sub).reshape(-1, QK_K // sub)  # noqa: E731
        d, sc = G.fp16_times_ints(per(step), max_mult)
        dmin, mn = G.fp16_times_ints(per(low), max_mult)
        exact = bool(
            np.all(d[:, None].astype(np.float64) * sc == per(step).astype(np.float64))
            and np.all(dmin[:, None].astype(np.float64) * mn == per(low).astype(np.float64))
            and np.all(sl.zero == np.rint(sl.zero))
        )

        def make() -> Encoded:
            lv = _blocks(sl.k, QK_K)
            pack = {T.Q2_K: _pack_q2_k, T.Q4_K: _pack_q4_k, T.Q5_K: _pack_q5_k}[qtype]
            data = pack(lv, d, dmin, sc, mn).reshape(rows, -1)
            return Encoded(qtype, data, exact, (sl.k, _times(d[:, None], sc), _times(dmin[:, None], mn)))

        return Fit(qtype, exact, make)
    lo, hi, max_mult = _SIGNED[qtype]
    s = sl.code_bits - sl.bits
    split = G.ggml_zero_split(sl.zero, s)
    if split is None or np.any(split[0] != s):
        return None  # no minimum: z must lie on the r-bit grid
    zq = split[1]
    if np.any(-zq < lo) or np.any(sl.max_level - zq > hi):  # the codes, not the grid, must fit then
        kg = _grouped(sl.k, sl.group_size)
        if kg is None:
            kg = (sl.k.astype(np.int32) - N.expand_groups(zq, cols, sl.group_size))[:, :, None]
            zq0 = 0
        else:
            zq0 = zq
        if np.any(kg.min(axis=2) - zq0 < lo) or np.any(kg.max(axis=2) - zq0 > hi):
            return None
    step = _per_block(sl.scale * np.float32(1 << s), cols, sl.group_size, sub).reshape(-1, QK_K // sub)
    d, sc = G.fp16_times_ints(step, max_mult)
    exact = bool(np.all(d[:, None].astype(np.float64) * sc == step.astype(np.float64)))

    def make_signed() -> Encoded:
        lv = _levels(sl, zq)
        data = (_pack_q3_k if qtype == T.Q3_K else _pack_q6_k)(_blocks(lv, QK_K), d, sc).reshape(rows, -1)
        return Encoded(qtype, data, exact, (lv, _times(d[:, None], sc), None))

    return Fit(qtype, exact, make_signed)


def _grouped(k: np.ndarray, group_size: int | None) -> np.ndarray | None:
    """``[rows, cols]`` as ``[rows, groups, weights]`` (one group per row without groups), so that
    per-group parameters broadcast without per-weight copies; None for a partial last group."""
    rows, cols = k.shape
    if group_size is not None and cols % group_size:
        return None
    return k.reshape(rows, 1 if group_size is None else cols // group_size, -1)


def _levels(sl: Slice, zq: np.ndarray, mult: np.ndarray | None = None) -> np.ndarray:
    """Signed levels ``k * mult - zq`` of the offset-free types, per-group integers ``[rows, groups]``."""
    rows, cols = sl.k.shape
    # int16 at half int32's memory traffic, where every product and difference fits it
    top = 255 * (1 if mult is None else int(np.max(np.abs(mult), initial=0)))
    itype = np.int16 if top + int(np.max(np.abs(zq), initial=0)) <= np.iinfo(np.int16).max else np.int32
    k = _grouped(sl.k.astype(itype), sl.group_size)
    zq = np.asarray(zq).astype(itype)
    if mult is not None:
        mult = np.asarray(mult).astype(itype)
    if k is None:
        k = sl.k.astype(itype)
        if mult is not None:
            k = k * N.expand_groups(mult, cols, sl.group_size)
        return k - N.expand_groups(zq, cols, sl.group_size)
    if mult is not None:
        k = k * mult[:, :, None]
    return (k - zq[:, :, None]).reshape(rows, cols)


def _times(d: np.ndarray, n: np.ndarray) -> np.ndarray:
    """A block's fp16 value times its integer multiplier, in float32 as ggml's decoder takes it."""
    return np.asarray(d, np.float32) * np.asarray(n).astype(np.float32)


# --- parameter choice ------------------------------------------------------------------------------
def _per_block(p: np.ndarray, cols: int, group_size: int | None, block: int) -> np.ndarray:
    """Per-group parameters ``[rows, groups]`` as ``[rows * blocks]`` (one per block, row-major)."""
    nb = cols // block
    idx = np.zeros(nb, np.intp) if group_size is None else (np.arange(nb) * block) // group_size
    return np.ascontiguousarray(p[:, idx]).reshape(-1)


def _blocks(levels: np.ndarray, block: int) -> np.ndarray:
    return levels.reshape(-1, block)


def _affine(sl: Slice, qtype: T) -> Fit | None:
    if sl.max_level > _AFFINE[qtype]:
        return None
    d, m = G.ggml_affine_params(sl.scale, sl.zero, sl.code_bits, sl.bits)
    if not (np.all(np.isfinite(d)) and np.all(np.isfinite(m))):
        return None
    exact = bool(G.ggml_exact(sl.scale, sl.zero, sl.code_bits, sl.bits, d, -m.astype(np.float64)).all())
    rows, cols = sl.k.shape

    def make() -> Encoded:
        db, mb = (_per_block(x, cols, sl.group_size, 32) for x in (d, m))
        lv = _blocks(sl.k, 32)
        data = _pack_q4_1(lv, db, mb) if qtype == T.Q4_1 else _pack_q5_1(lv, db, mb)
        return Encoded(qtype, data.reshape(rows, -1), exact, (sl.k, db, -mb))

    return Fit(qtype, exact, make)


def _kquant(sl: Slice, qtype: T) -> Fit | None:
    top, max_mult = _KQUANT[qtype]
    if sl.max_level > top:
        return None
    d, sc, dmin, mn = G.ggml_k_params(sl.scale, sl.zero, sl.code_bits, sl.bits, max_mult)
    if not (np.all(np.isfinite(d)) and np.all(np.isfinite(dmin))):
        return None
    step = d.astype(np.float64) * sc
    low = dmin.astype(np.float64) * mn
    exact = bool(G.ggml_exact(sl.scale, sl.zero, sl.code_bits, sl.bits, step, low).all())
    rows, cols = sl.k.shape

    def make() -> Encoded:
        per = lambda x: _per_block(x, cols, sl.group_size, QK_K)  # noqa: E731
        db, scb, dminb, mnb = per(d), per(sc), per(dmin), per(mn)
        lv = _blocks(sl.k, QK_K)
        if qtype == T.Q2_K:
            data = _pack_q2_k(lv, db, dminb, _sub(scb, 16), _sub(mnb, 16))
        elif qtype == T.Q4_K:
            data = _pack_q4_k(lv, db, dminb, _sub(scb, 8), _sub(mnb, 8))
        else:
            data = _pack_q5_k(lv, db, dminb, _sub(scb, 8), _sub(mnb, 8))
        return Encoded(qtype, data.reshape(rows, -1), exact, (sl.k, _times(db, scb), _times(dminb, mnb)))

    return Fit(qtype, exact, make)


def _signed(sl: Slice, qtype: T) -> Fit | None:
    lo, hi, max_mult = _SIGNED[qtype]
    s = sl.code_bits - sl.bits
    split = G.ggml_zero_split(sl.zero, s)
    if split is None:
        return None
    j, zq = split
    if max_mult is not None and np.any(j != s):
        return None  # K types without a minimum need z on the r-bit grid
    mult = np.left_shift(1, s - j)
    if np.any(-zq < lo) or np.any(sl.max_level * mult - zq > hi):
        return None
    a = np.asarray(sl.scale, np.float32)
    if max_mult is None:
        d = N.fp16_round(a * np.exp2(j).astype(np.float32))
        step = d.astype(np.float64) * mult
    else:
        d, sc = G.fp16_times_int(a * np.float32(1 << s), max_mult)
        step = d.astype(np.float64) * sc
    if not np.all(np.isfinite(d)):
        return None
    exact = bool(G.ggml_exact(sl.scale, sl.zero, sl.code_bits, sl.bits, step).all())
    rows, cols = sl.k.shape

    def make() -> Encoded:
        levels = _levels(sl, zq, mult)
        if qtype in _BLOCK32:
            db = _per_block(d, cols, sl.group_size, 32)
            data = _BLOCK32[qtype](_blocks(levels, 32), db)
            step = db
        else:
            db = _per_block(d, cols, sl.group_size, QK_K)
            scb = _per_block(sc, cols, sl.group_size, QK_K)
            lv = _blocks(levels, QK_K)
            data = _pack_q3_k(lv, db, _sub(scb, 16)) if qtype == T.Q3_K else _pack_q6_k(lv, db, _sub(scb, 16))
            step = _times(db, scb)
        return Encoded(qtype, data.reshape(rows, -1), exact, (levels, step, None))

    return Fit(qtype, exact, make)


def _sub(p: np.ndarray, n: int) -> np.ndarray:
    """One super-block parameter repeated for its ``n`` sub-blocks."""
    return np.repeat(p[:, None], n, axis=1)


# --- byte layouts (ggml-common.h; gguf.quants decodes them) ----------------------------------------
def _f16(x: np.ndarray) -> np.ndarray:
    """fp16-exact float32 values per block as their 2 little-endian bytes."""
    return np.asarray(x, np.float32).astype("<f2").reshape(-1, 1).view(np.uint8)


def _u8(x: np.ndarray) -> np.ndarray:
    return np.asarray(x).astype(np.uint8)


def _pack_q4_1(lv: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    q = _u8(lv)
    qs = q[:, :16] | (q[:, 16:] << 4)
    return np.concatenate([_f16(d), _f16(m), qs], axis=1)


def _pack_q5_1(lv: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    q = _u8(lv)
    qh = np.packbits((q >> 4) & 1, axis=1, bitorder="little")
    qs = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    return np.concatenate([_f16(d), _f16(m), qh, qs], axis=1)


def _pack_q8_0(lv: np.ndarray, d: np.ndarray) -> np.ndarray:
    return np.concatenate([_f16(d), lv.astype(np.int8).view(np.uint8)], axis=1)


def _pack_q4_0(lv: np.ndarray, d: np.ndarray) -> np.ndarray:
    q = _u8(lv + 8)
    return np.concatenate([_f16(d), q[:, :16] | (q[:, 16:] << 4)], axis=1)


def _pack_q5_0(lv: np.ndarray, d: np.ndarray) -> np.ndarray:
    q = _u8(lv + 16)
    qh = np.packbits((q >> 4) & 1, axis=1, bitorder="little")
    qs = (q[:, :16] & 0x0F) | ((q[:, 16:] & 0x0F) << 4)
    return np.concatenate([_f16(d), qh, qs], axis=1)


def _pack_q2_0(lv: np.ndarray, d: np.ndarray) -> np.ndarray:
    """ggml's block_q2_0: fp16 ``d``, 64 levels of 2 bits, four to a byte, first in the low bits."""
    q = _u8(lv).reshape(lv.shape[0], -1, 4)
    return np.concatenate([_f16(d), q[..., 0] | (q[..., 1] << 2) | (q[..., 2] << 4) | (q[..., 3] << 6)], axis=1)


_BLOCK32 = {T.Q8_0: _pack_q8_0, T.Q5_0: _pack_q5_0, T.Q4_0: _pack_q4_0}
"""The offset-free 32-weight types: one fp16 scale per block, signed levels."""


def _pack_q2_k(lv: np.ndarray, d, dmin, sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    n = lv.shape[0]
    v = _u8(lv).reshape(n, 2, 4, 32)
    qs = (v[:, :, 0] | (v[:, :, 1] << 2) | (v[:, :, 2] << 4) | (v[:, :, 3] << 6)).reshape(n, 64)
    scales = _u8(sc) | (_u8(mn) << 4)
    return np.concatenate([scales, qs, _f16(d), _f16(dmin)], axis=1)


def _k_scales(sc: np.ndarray, mn: np.ndarray) -> np.ndarray:
    """Eight 6-bit scales and mins in Q4_K/Q5_K's 12 bytes (gguf.quants.Q4_K.get_scale_min inverted)."""
    sc, mn = _u8(sc), _u8(mn)
    lo = (sc[:, :4] & 63) | ((sc[:, 4:] >> 4) << 6)
    mid = (mn[:, :4] & 63) | ((mn[:, 4:] >> 4) << 6)
    hi = (sc[:, 4:] & 0x0F) | ((mn[:, 4:] & 0x0F) << 4)
    return np.concatenate([lo, mid, hi], axis=1)


def _nibbles_k(q: np.ndarray) -> np.ndarray:
    n = q.shape[0]
    v = (q & 0x0F).reshape(n, 4, 2, 32)
    return (v[:, :, 0] | (v[:, :, 1] << 4)).reshape(n, 128)


def _pack_q4_k(lv: np.ndarray, d, dmin, sc, mn) -> np.ndarray:
    return np.concatenate([_f16(d), _f16(dmin), _k_scales(sc, mn), _nibbles_k(_u8(lv))], axis=1)


def _pack_q5_k(lv: np.ndarray, d, dmin, sc, mn) -> np.ndarray:
    q = _u8(lv)
    hb = ((q >> 4) & 1).reshape(q.shape[0], 8, 32)
    qh = np.zeros((q.shape[0], 32), np.uint8)
    for j in range(8):
        qh |= hb[:, j] << j
    return np.concatenate([_f16(d), _f16(dmin), _k_scales(sc, mn), qh, _nibbles_k(q)], axis=1)


def _pack_q6_k(lv: np.ndarray, d, sc: np.ndarray) -> np.ndarray:
    n = lv.shape[0]
    u = _u8(lv + 32)
    a = u.reshape(n, 2, 2, 64)
    ql = ((a[:, :, 0] & 0x0F) | ((a[:, :, 1] & 0x0F) << 4)).reshape(n, 128)
    b = (u >> 4).reshape(n, 2, 4, 32)
    qh = (b[:, :, 0] | (b[:, :, 1] << 2) | (b[:, :, 2] << 4) | (b[:, :, 3] << 6)).reshape(n, 64)
    return np.concatenate([ql, qh, np.asarray(sc).astype(np.int8).view(np.uint8), _f16(d)], axis=1)


def _pack_q3_k(lv: np.ndarray, d, sc: np.ndarray) -> np.ndarray:
    n = lv.shape[0]
    u = _u8(lv + 4)
    s6 = _u8(np.asarray(sc).astype(np.int16) + 32)
    low = (s6[:, :8] & 0x0F) | ((s6[:, 8:] & 0x0F) << 4)
    top = (s6 >> 4).reshape(n, 4, 4)
    high = top[:, 0] | (top[:, 1] << 2) | (top[:, 2] << 4) | (top[:, 3] << 6)
    q = (u & 3).reshape(n, 2, 4, 32)
    qs = (q[:, :, 0] | (q[:, :, 1] << 2) | (q[:, :, 2] << 4) | (q[:, :, 3] << 6)).reshape(n, 64)
    hb = (u >> 2).reshape(n, 8, 32)
    hmask = np.zeros((n, 32), np.uint8)
    for t in range(8):
        hmask |= hb[:, t] << t
    return np.concatenate([hmask, qs, low, high, _f16(d)], axis=1)
