"""Every formula of matq, defined once. Exporters, the reader and the trainer all call these.

Notation (spec/v1 section "Numerics"): ``c`` code bits, ``r`` served bits, ``s = c - r``,
``q`` the c-bit code, ``k`` the sliced code in the r-bit domain, ``alpha`` the scale, ``z`` the
zero point on the c-bit scale. All arithmetic is float32 in the order written here; exports that
claim bit-exactness are checked against these functions.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import ml_dtypes
import numpy as np

from . import constants as C

_BF16 = np.dtype(ml_dtypes.bfloat16)

try:
    from . import _quantkernel as _qk
except ImportError:  # pragma: no cover - no compiler at install time
    _qk = None

USE_KERNEL = True
"""Use the compiled kernels (group min/max, quantize) when present; tests turn this off to compare
with the numpy code below, which is the reference (the kernels must give identical results)."""

__all__ = [
    "check_width",
    "code_max",
    "expand_groups",
    "minmax_params",
    "quantize",
    "slice_codes",
    "slice_codes_c_scale",
    "dequantize_codes",
    "dequantize",
    "round_scale",
    "extra_bucket_share",
    "bits_per_weight",
    "planes_needed",
    "multiwidth_codes",
    "multiwidth_cost",
    "multiwidth_params",
    "fp16_round",
    "fp16_times_int",
    "ggml_affine_params",
    "ggml_k_params",
    "ggml_zero_split",
    "ggml_exact",
    "dequantize_q4_1_reference",
    "dequantize_k_reference",
    "dequantize_q8_0_reference",
]


def code_max(bits: int) -> int:
    return (1 << bits) - 1


def check_width(code_bits: int, bits: int) -> None:
    if not (C.MIN_CODE_BITS <= code_bits <= C.MAX_CODE_BITS_SPEC):
        raise ValueError(f"code bits {code_bits} outside {C.MIN_CODE_BITS}..{C.MAX_CODE_BITS_SPEC}")
    if not (1 <= bits <= code_bits):
        raise ValueError(f"width {bits} outside 1..{code_bits}")


def planes_needed(code_bits: int, bits: int) -> tuple[int, ...]:
    """Bit-planes (0 = least significant) that a width-``bits`` slice reads: the top r and the rounding plane."""
    check_width(code_bits, bits)
    lowest = max(code_bits - bits - 1, 0)
    return tuple(range(code_bits - 1, lowest - 1, -1))


def n_groups(cols: int, group_size: int | None) -> int:
    return 1 if group_size is None else -(-cols // group_size)


def expand_groups(p: np.ndarray, cols: int, group_size: int | None) -> np.ndarray:
    """Broadcast per-group parameters ``[rows, groups]`` to ``[rows, cols]``."""
    if group_size is None:
        return p[:, :1]
    # Indexing, not np.repeat: a group size far larger than cols must not allocate rows*group_size.
    return p[:, np.arange(cols) // group_size]


def round_scale(alpha: np.ndarray, dtype: str) -> np.ndarray:
    """Round scales to the stored dtype, upward so the rounded scale still covers the range."""
    alpha = np.asarray(alpha, dtype=np.float32)
    if dtype == "F32":
        return alpha
    if dtype == "F16":
        with np.errstate(over="ignore"):  # too large for float16: inf, refused just below
            r = alpha.astype(np.float16)
            low = r.astype(np.float32) < alpha
            r[low] = np.nextafter(r[low], np.float16(np.inf))
        if not np.all(np.isfinite(r)):
            raise OverflowError("scale does not fit float16")
        return r.astype(np.float32)
    if dtype == "BF16":
        bits = alpha.view(np.uint32)
        trunc = bits & np.uint32(0xFFFF0000)
        up = (trunc != bits).astype(np.uint32) << np.uint32(16)
        return (trunc + up).view(np.float32)
    raise ValueError(f"unknown scale dtype {dtype}")


def minmax_params(
    w: np.ndarray,
    code_bits: int = C.DEFAULT_CODE_BITS,
    group_size: int | None = None,
    *,
    symmetric: bool = False,
    zero_multiple: int = 1,
    scale_dtype: str = "F16",
) -> tuple[np.ndarray, np.ndarray]:
    """MinMax scale and integer zero point per row (``group_size=None``) or per group of columns.

    The range always includes 0 so that zero weights stay exact. ``zero_multiple`` forces z onto a
    multiple of ``2**m`` so that every slice down to ``c - log2(m)`` bits has an integer zero point
    (needed by integer-zero formats); ``symmetric`` fixes ``z = 2**(c-1)``. The scale is then the
    smallest that covers the range with that zero point, rounded up to ``scale_dtype``.
    """
    w = w if _bf16_bits(w) is not None else np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError("quantized tensors are 2-D [rows, cols]")
    lo32, hi32 = group_minmax(w, group_size)
    sd = _SCALE_DTYPE_CODE.get(scale_dtype)
    if USE_KERNEL and _qk is not None and sd is not None and zero_multiple >= 1 and code_bits <= 16:
        lo32, hi32 = np.ascontiguousarray(lo32), np.ascontiguousarray(hi32)
        a, z = np.empty_like(lo32), np.empty_like(lo32)
        rc = _qk.params(lo32, hi32, lo32.size, code_max(code_bits), symmetric, zero_multiple, sd, a, z)
        if rc == 1:
            return a, z
        if rc == 0:
            raise OverflowError("scale does not fit float16")
    return minmax_params_from_range(
        lo32, hi32, code_bits, symmetric=symmetric, zero_multiple=zero_multiple, scale_dtype=scale_dtype
    )


_SCALE_DTYPE_CODE = {"F32": 0, "F16": 1, "BF16": 2}  # the compiled kernel's names for scale dtypes


def minmax_params_from_range(
    lo32: np.ndarray,
    hi32: np.ndarray,
    code_bits: int = C.DEFAULT_CODE_BITS,
    *,
    symmetric: bool = False,
    zero_multiple: int = 1,
    scale_dtype: str = "F16",
) -> tuple[np.ndarray, np.ndarray]:
    """The reference arithmetic of :func:`minmax_params`, from each group's float32 min and max."""
    lo32, hi32 = np.asarray(lo32, np.float32), np.asarray(hi32, np.float32)
    lo = np.minimum(lo32, 0.0).astype(np.float64)
    hi = np.maximum(hi32, 0.0).astype(np.float64)
    qmax = code_max(code_bits)
    if symmetric:
        z = np.full(lo.shape, float(1 << (code_bits - 1)))
    else:
        span = hi - lo
        with np.errstate(invalid="ignore"):  # inf / inf for infinite weights: NaN, refused by callers
            z0 = np.where(span > 0, -lo / np.where(span > 0, span, 1.0) * qmax, 0.0)
        m = float(zero_multiple)
        cands = [np.floor(z0 / m) * m, np.ceil(z0 / m) * m] if m > 1 else [np.rint(z0)]
        best_z, best_a = None, None
        for zc in cands:
            zc = np.clip(zc, 0, np.floor(qmax / m) * m)
            a = _alpha_for_zero(lo, hi, zc, qmax)
            if best_a is None:
                best_z, best_a = zc, a
            else:
                take = a < best_a
                best_z, best_a = np.where(take, zc, best_z), np.where(take, a, best_a)
        if m == 1:  # rint can give z = 0 (or qmax) while a tiny negative (positive) side remains
            for zc in (np.floor(z0), np.ceil(z0)):
                zc = np.clip(zc, 0, qmax)
                a = _alpha_for_zero(lo, hi, zc, qmax)
                take = ~np.isfinite(best_a) & (a < best_a)
                best_z, best_a = np.where(take, zc, best_z), np.where(take, a, best_a)
        z = best_z
    alpha = _alpha_for_zero(lo, hi, z, qmax)
    alpha = np.where(alpha > 0, alpha, 1.0)
    alpha = np.where(np.isfinite(lo) & np.isfinite(hi), alpha, np.nan)  # NaN or inf weights: NaN scale
    alpha = round_scale(alpha.astype(np.float32), scale_dtype)
    return alpha.astype(np.float32), z.astype(np.float32)


def _bf16_bits(w) -> np.ndarray | None:
    """bfloat16 weights as their uint16 bits, for the kernels that widen them on the fly; else None.

    Widening bfloat16 to float32 is exact, so this changes no result, only skips a float32 copy.
    """
    if USE_KERNEL and _qk is not None and w.dtype == _BF16 and w.flags.c_contiguous and w.ndim == 2:
        return w.view(np.uint16)
    return None


def reads_bf16_as_stored(w: np.ndarray, code_bits: int) -> bool:
    """Whether :func:`minmax_params` and :func:`quantize` take these bfloat16 weights without a
    float32 copy (the compiled kernels widen them on the fly, exactly); callers can then skip theirs."""
    return code_bits <= 8 and _bf16_bits(w) is not None


def group_minmax(w: np.ndarray, group_size: int | None) -> tuple[np.ndarray, np.ndarray]:
    """Smallest and largest weight per row and group, float32 ``[rows, groups]``."""
    bits = _bf16_bits(w)
    rows, cols = w.shape
    g = cols if group_size is None else min(group_size, max(cols, 1))  # no padding past a row
    if bits is not None and cols % g == 0 and w.size:
        lo = np.empty((rows, cols // g), np.float32)
        hi = np.empty((rows, cols // g), np.float32)
        if _qk.minmax_bf16(bits, rows * (cols // g), g, lo, hi):
            return lo, hi
    w = np.asarray(w, dtype=np.float32)
    if USE_KERNEL and _qk is not None and cols % g == 0 and w.size and w.flags.c_contiguous:
        lo = np.empty((rows, cols // g), np.float32)
        hi = np.empty((rows, cols // g), np.float32)
        if _qk.minmax(w, rows * (cols // g), g, lo, hi):
            return lo, hi
    pad = (-cols) % g
    wp = np.pad(w, ((0, 0), (0, pad)), mode="edge") if pad else w
    wg = wp.reshape(rows, -1, g)
    return wg.min(axis=2), wg.max(axis=2)


def _alpha_for_zero(lo: np.ndarray, hi: np.ndarray, z: np.ndarray, qmax: int) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(hi > 0, hi / (qmax - z), 0.0)
        down = np.where(lo < 0, -lo / z, 0.0)
    up = np.where((hi > 0) & (z >= qmax), np.inf, up)
    down = np.where((lo < 0) & (z <= 0), np.inf, down)
    return np.maximum(up, down)


def quantize(
    w: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    code_bits: int,
    group_size: int | None,
    *,
    out: np.ndarray | None = None,
    work: np.ndarray | None = None,
) -> np.ndarray:
    """``q = clip(rint(w / alpha) + z, 0, 2^c - 1)`` in float32, round half to even.

    ``out`` receives the codes; ``work`` (float32, w's shape, may be ``w`` itself) holds the
    intermediate, so streaming callers can reuse buffers instead of faulting in fresh ones.
    """
    bits = _bf16_bits(w)
    if bits is None:
        w = np.asarray(w, dtype=np.float32)
    rows, cols = w.shape
    if USE_KERNEL and _qk is not None and code_bits <= 8 and cols > 0 and w.flags.c_contiguous:
        if out is None:
            out = np.empty((rows, cols), np.uint8)
        if out.dtype == np.uint8 and out.flags.c_contiguous:
            g = cols if group_size is None else min(group_size, max(cols, 1))  # no padding past a row
            groups = n_groups(cols, group_size)
            a = np.ascontiguousarray(np.broadcast_to(np.asarray(scale, np.float32), (rows, groups)))
            z = np.ascontiguousarray(np.broadcast_to(np.asarray(zero, np.float32), (rows, groups)))
            if bits is not None:
                _qk.quantize_bf16(bits, rows, cols, g, a, z, code_max(code_bits), out)
            else:
                _qk.quantize(w, rows, cols, g, a, z, code_max(code_bits), out)
            return out
    w = np.asarray(w, dtype=np.float32)
    a = expand_groups(np.asarray(scale, np.float32), cols, group_size)
    z = expand_groups(np.asarray(zero, np.float32), cols, group_size)
    q = np.divide(w, a, out=work)
    np.rint(q, out=q)
    np.add(q, z, out=q)
    np.clip(q, 0, code_max(code_bits), out=q)
    if out is None:
        return q.astype(np.uint8 if code_bits <= 8 else np.uint16)
    np.copyto(out, q, casting="unsafe")
    return out


def slice_codes(q: np.ndarray, code_bits: int, bits: int, extra_precision: bool = False) -> np.ndarray:
    """Eq. 6 in the r-bit domain: ``k = (q >> s) + ((q >> (s-1)) & 1)``, clamped to ``2^r - 1``.

    With ``extra_precision`` the clamp is dropped, so ``k`` may equal ``2^r`` (the extra bucket).
    ``bits == code_bits`` returns the codes unchanged.
    """
    check_width(code_bits, bits)
    q = np.asarray(q)
    if bits == code_bits:
        return q.copy()
    s = code_bits - bits
    k = (q >> s) + ((q >> (s - 1)) & 1)
    if not extra_precision:
        k = np.minimum(k, code_max(bits))
    return k.astype(q.dtype)


def slice_codes_c_scale(
    q: np.ndarray, code_bits: int, bits: int, extra_precision: bool = False
) -> np.ndarray:
    """S(q, r) on the c-bit scale (``k << s``), as the paper writes it; int32 because 2^c may appear."""
    return slice_codes(q, code_bits, bits, extra_precision).astype(np.int32) << (code_bits - bits)


def dequantize_codes(
    k: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    code_bits: int,
    bits: int,
    group_size: int | None,
) -> np.ndarray:
    """``w = alpha * (k * 2^s - z)``, all float32: the reference every reader and export matches."""
    cols = k.shape[1]
    a = expand_groups(np.asarray(scale, np.float32), cols, group_size)
    z = expand_groups(np.asarray(zero, np.float32), cols, group_size)
    kf = k.astype(np.float32) * np.float32(1 << (code_bits - bits))
    return (a * (kf - z)).astype(np.float32)


def dequantize(
    q: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    code_bits: int,
    bits: int,
    group_size: int | None,
    extra_precision: bool = False,
) -> np.ndarray:
    """Slice full codes to ``bits`` and dequantize."""
    k = slice_codes(q, code_bits, bits, extra_precision)
    return dequantize_codes(k, scale, zero, code_bits, bits, group_size)


def extra_bucket_share(q: np.ndarray, code_bits: int, bits: int) -> float:
    """Fraction of weights whose extra-precision slice lands in the extra bucket (k == 2^r)."""
    if bits >= code_bits or q.size == 0:
        return 0.0
    s = code_bits - bits
    return float(np.count_nonzero(q >= ((1 << code_bits) - (1 << (s - 1)))) / q.size)


def bits_per_weight(
    bits: int,
    rows: int,
    cols: int,
    group_size: int | None,
    scale_bytes: int,
    zero_bytes: int,
    extra_share: float = 0.0,
) -> float:
    """Served cost of one tensor in bits per weight: codes, scales and zero points, extra bucket.

    The extra bucket is costed as the paper suggests, as a sparse list of 32-bit positions, or a
    1-bit dense mask when that is cheaper.
    """
    n = rows * cols
    params = rows * n_groups(cols, group_size) * (scale_bytes + zero_bytes) * 8
    return bits + params / n + min(1.0, 32.0 * extra_share)


# --- GGUF (ggml) block types ----------------------------------------------------------------------
# A width-r slice is w = alpha * (k * 2^s - z). ggml types hold it as integer levels per block with
# fp16 block parameters. The functions below define those parameters, their fp16 rounding, and the
# float32 arithmetic of ggml's reference decoder (gguf.quants) in its order. The GGUF export packs
# what they return; its tests decode the file with gguf and compare against them bit for bit.


def fp16_round(x: np.ndarray) -> np.ndarray:
    """float32 rounded to the nearest float16 (ties to even), returned as float32; inf on overflow."""
    with np.errstate(over="ignore"):
        return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def fp16_times_int(target: np.ndarray, max_mult: int) -> tuple[np.ndarray, np.ndarray]:
    """An fp16 ``b`` and an integer ``1 <= n <= max_mult`` whose float32 product is nearest ``target``.

    K-quants store each block parameter as an fp16 super-block value times a small integer;
    searching the integer gives ``b * n == target`` exactly whenever some fp16 value allows it.
    Ties go to the smallest ``n``. Where no product is finite, ``b`` is ``fp16(target)`` (inf).
    """
    t = np.asarray(target, np.float32)
    best_b = fp16_round(t)
    best_n = np.ones(t.shape, np.uint8)
    best_err = np.full(t.shape, np.inf, np.float32)
    with np.errstate(over="ignore", invalid="ignore"):
        for n in range(1, max_mult + 1):
            b = fp16_round(t / np.float32(n))
            err = np.abs(b * np.float32(n) - t)
            take = np.isfinite(err) & (err < best_err)
            best_b = np.where(take, b, best_b)
            best_n = np.where(take, np.uint8(n), best_n)
            best_err = np.where(take, err, best_err)
            if not np.any(best_err):
                break
    return best_b, best_n


def fp16_times_ints(target: np.ndarray, max_mult: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row of ``target`` ``[n, m]`` (one K-quant super-block's sub-blocks): an fp16 ``b`` and
    integers ``0 <= sc <= max_mult`` with ``b * sc`` nearest each target.

    The largest target takes the largest multiplier that makes every product of its row exact, if
    one does; otherwise ``max_mult`` (the finest steps), and each sub-block is rounded to its
    nearest multiple. Rows of zeros get ``b = 0``.
    """
    t = np.asarray(target, np.float32)
    top = t.max(axis=1, initial=0)

    def fit(n: int):
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            b = fp16_round(top / np.float32(n))
            sc = np.where(b[:, None] > 0, np.rint(t / b[:, None]), 0)
        sc = np.clip(np.nan_to_num(sc), 0, max_mult)
        exact = np.all(b[:, None] * sc.astype(np.float32) == t, axis=1)
        return b, sc.astype(np.int32), exact

    b, sc, exact = fit(max_mult)
    for n in range(max_mult - 1, 0, -1):
        if exact.all():
            break
        bn, scn, ok = fit(n)
        take = ok & ~exact
        b, sc, exact = np.where(take, bn, b), np.where(take[:, None], scn, sc), exact | take
    return b, sc


NEST_BLOCK = 256
"""Columns per K-quant super-block: the span whose group scales ``nest_scales`` ties together."""
NEST_MULT = 15
"""Largest group multiplier: Q2_K's 4-bit sub-block scales, the smallest of the K-quants."""


def nest_scales(alpha: np.ndarray, cols: int, group_size: int | None) -> np.ndarray:
    """Scales that every K-quant holds exactly at every width: within each 256 columns of a row,
    ``alpha_g = D * m_g`` with one ``D`` (an fp16 value of at most 7 significant bits, so that
    ``D * m_g`` is fp16 too) and integers ``1 <= m_g <= 15``, each rounded up so that the group's
    range stays covered. A K-quant then stores ``D * 2^(c-r)`` per super-block and ``m_g`` per
    sub-block. Per-channel scales, and rows whose length is not a multiple of 256, are returned
    as they are (they nest already, or no K-quant can hold them).
    """
    a = np.asarray(alpha, np.float32)
    if group_size is None or cols % NEST_BLOCK or NEST_BLOCK % group_size:
        return a
    rows = a.shape[0]
    per = a.reshape(rows, cols // NEST_BLOCK, NEST_BLOCK // group_size).astype(np.float64)
    need = per.max(axis=2, keepdims=True) / NEST_MULT
    exp = np.floor(np.log2(np.where(need > 0, need, 1.0))) - 6  # 7 significant bits: D = k * 2^exp
    d = np.ceil(need / np.exp2(exp)) * np.exp2(exp)
    m = np.clip(np.ceil(per / d), 1, NEST_MULT)
    return round_scale((d * m).reshape(rows, -1).astype(np.float32), "F16")


def ggml_affine_params(
    scale: np.ndarray, zero: np.ndarray, code_bits: int, bits: int
) -> tuple[np.ndarray, np.ndarray]:
    """Q4_1 and Q5_1 (``w = d*k + m``) for a width-``bits`` slice: ``d = fp16(2^s alpha)``, ``m = fp16(-alpha z)``."""
    a = np.asarray(scale, np.float32)
    z = np.asarray(zero, np.float32)
    return fp16_round(a * np.float32(1 << (code_bits - bits))), fp16_round(-(a * z))


def ggml_k_params(
    scale: np.ndarray, zero: np.ndarray, code_bits: int, bits: int, max_mult: int
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Q2_K, Q4_K, Q5_K (``w = (d*sc)*k - dmin*mn``): ``d*sc`` nearest ``2^s alpha``, ``dmin*mn`` nearest ``alpha z``.

    ``sc`` and ``mn`` are the sub-block integers (up to 15 for Q2_K, 63 for Q4_K/Q5_K).
    """
    a = np.asarray(scale, np.float32)
    z = np.asarray(zero, np.float32)
    d, sc = fp16_times_int(a * np.float32(1 << (code_bits - bits)), max_mult)
    dmin, mn = fp16_times_int(a * z, max_mult)
    return d, sc, dmin, mn


def ggml_zero_split(zero: np.ndarray, max_shift: int) -> tuple[np.ndarray, np.ndarray] | None:
    """Split integer zero points as ``z = zq * 2^j`` with ``j`` the largest shift up to ``max_shift``.

    Offset-free types (Q8_0, Q3_K, Q6_K) hold ``w = 2^j alpha * (k * 2^(s-j) - zq)`` with integer
    levels. None when a zero point is not an integer.
    """
    z = np.asarray(zero, np.float32)
    if np.any(z != np.rint(z)):
        return None
    zi = z.astype(np.int64)
    j = np.full(zi.shape, max_shift, np.int64)
    for t in range(max_shift - 1, -1, -1):
        j = np.where(zi % (1 << (t + 1)) != 0, t, j)
    return j, zi >> j


def ggml_exact(
    scale: np.ndarray,
    zero: np.ndarray,
    code_bits: int,
    bits: int,
    step: np.ndarray,
    offset: np.ndarray | None = None,
) -> np.ndarray:
    """Per group: does a ggml block decode bit-identically to :func:`dequantize_codes`?

    ``step`` is the block's float64 value of one level at the r-bit scale (``d``, ``d*sc``, or
    ``d * 2^(s-j)`` for Q8_0) and ``offset`` its value of the minimum (``-m`` or ``dmin*mn``;
    None where the offset lives in integer levels). If ``step == 2^s alpha`` and
    ``offset == alpha z`` as real numbers and ``z`` is an integer, ggml's products are exact and
    its one rounded operation rounds the same real number that dequantize_codes rounds once.
    """
    a = np.asarray(scale, np.float64)
    z = np.asarray(zero, np.float64)
    ok = (np.asarray(step, np.float64) == a * float(1 << (code_bits - bits))) & (z == np.rint(z))
    if offset is not None:
        ok &= np.asarray(offset, np.float64) == a * z
    return ok


def dequantize_q4_1_reference(k: np.ndarray, d: np.ndarray, m: np.ndarray) -> np.ndarray:
    """Q4_1/Q5_1 decode as ggml does it: ``d*k + m`` in float32 (parameters broadcast per element)."""
    return (np.asarray(d, np.float32) * k.astype(np.float32)) + np.asarray(m, np.float32)


def dequantize_k_reference(
    k: np.ndarray, d: np.ndarray, sc: np.ndarray, dmin: np.ndarray, mn: np.ndarray
) -> np.ndarray:
    """Q2_K/Q4_K/Q5_K decode as ggml does it: ``(d*sc)*k - dmin*mn`` in float32."""
    step = np.asarray(d, np.float32) * np.asarray(sc, np.float32)
    low = np.asarray(dmin, np.float32) * np.asarray(mn, np.float32)
    return step * k.astype(np.float32) - low


def dequantize_q8_0_reference(q: np.ndarray, d: np.ndarray) -> np.ndarray:
    """Q8_0, and Q3_K/Q6_K with ``d*sc`` as ``d``: signed integer levels times the block scale, float32."""
    return q.astype(np.float32) * np.asarray(d, np.float32)


# --- multi-width-aware rounding ------------------------------------------------------------------
# The train-free analogue of the MatQuant objective (Eq. 7): instead of rounding w to the nearest
# c-bit code, pick the code whose slices are jointly best, minimising per weight
#     sum_r lambda_r * (w - alpha * (S(q, r) - z))^2.
# With x = w / alpha + z (the weight on the c-bit scale), L = sum_r lambda_r, A(q) = sum_r lambda_r S(q,r)
# and B(q) = sum_r lambda_r S(q,r)^2, the cost of code q is alpha^2 * (L x^2 - 2 x A(q) + B(q)): a line
# in x per code, so the best code is their lower envelope, a sorted list of breakpoints computed once
# per (c, widths, lambdas). Lookup is exact and costs a table gather, not a search over 2^c codes.

MULTIWIDTH_WIDTHS = (8, 4, 2)
MULTIWIDTH_LAMBDAS = (1.0, 1.0, 1.0)
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
) -> tuple[np.ndarray, np.ndarray]:
    """Scale and zero point per row or group chosen for the multi-width objective.

    Candidates are ``minmax_params`` of the range ``[f * min, f * max]``: f below 1 clips outliers,
    above 1 widens the range so the clamped top slice level reaches the largest weights. Each is
    scored by the cost of its multi-width codes; every factor in ``grid`` is tried, then each row
    or group tries its best factor plus and minus every step of ``refine``. ``1.0`` is always a
    candidate, so the result is never worse on the objective than MinMax.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError("quantized tensors are 2-D [rows, cols]")
    rows, cols = w.shape
    g = cols if group_size is None else min(group_size, max(cols, 1))  # no padding past a row
    pad = (-cols) % g
    wg = (np.pad(w, ((0, 0), (0, pad)), mode="edge") if pad else w).reshape(rows, -1, g)
    ends = np.stack([np.minimum(wg.min(axis=2), 0.0), np.maximum(wg.max(axis=2), 0.0)], axis=-1)

    def score(f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, z = minmax_params(
            (ends * f[..., None]).reshape(-1, 2),
            code_bits,
            None,
            symmetric=symmetric,
            zero_multiple=zero_multiple,
            scale_dtype=scale_dtype,
        )
        a, z = a.reshape(ends.shape[:2]), z.reshape(ends.shape[:2])
        _, e = multiwidth_cost(w, a, z, code_bits, group_size, widths, lambdas, extra_precision, exact=False)
        return a, z, e

    return search_range_factors(score, ends.shape[:2], grid, refine)


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
