"""Every formula of matq, defined once. Exporters, the reader and the trainer all call these.

Notation (spec/v1 section "Numerics"): ``c`` code bits, ``r`` served bits, ``s = c - r``,
``q`` the c-bit code, ``k`` the sliced code in the r-bit domain, ``alpha`` the scale, ``z`` the
zero point on the c-bit scale. All arithmetic is float32 in the order written here; exports that
claim bit-exactness are checked against these functions.
"""

from __future__ import annotations

import numpy as np

from . import constants as C

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
    return np.repeat(p, group_size, axis=1)[:, :cols]


def round_scale(alpha: np.ndarray, dtype: str) -> np.ndarray:
    """Round scales to the stored dtype, upward so the rounded scale still covers the range."""
    alpha = np.asarray(alpha, dtype=np.float32)
    if dtype == "F32":
        return alpha
    if dtype == "F16":
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
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError("quantized tensors are 2-D [rows, cols]")
    rows, cols = w.shape
    g = cols if group_size is None else group_size
    pad = (-cols) % g
    wp = np.pad(w, ((0, 0), (0, pad)), mode="edge") if pad else w
    wg = wp.reshape(rows, -1, g)
    lo = np.minimum(wg.min(axis=2), 0.0).astype(np.float64)
    hi = np.maximum(wg.max(axis=2), 0.0).astype(np.float64)
    qmax = code_max(code_bits)
    if symmetric:
        z = np.full(lo.shape, float(1 << (code_bits - 1)))
    else:
        span = hi - lo
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
        z = best_z
    alpha = _alpha_for_zero(lo, hi, z, qmax)
    alpha = np.where(alpha > 0, alpha, 1.0)
    alpha = round_scale(alpha.astype(np.float32), scale_dtype)
    return alpha.astype(np.float32), z.astype(np.float32)


def _alpha_for_zero(lo: np.ndarray, hi: np.ndarray, z: np.ndarray, qmax: int) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        up = np.where(hi > 0, hi / (qmax - z), 0.0)
        down = np.where(lo < 0, -lo / z, 0.0)
    up = np.where((hi > 0) & (z >= qmax), np.inf, up)
    down = np.where((lo < 0) & (z <= 0), np.inf, down)
    return np.maximum(up, down)


def quantize(
    w: np.ndarray, scale: np.ndarray, zero: np.ndarray, code_bits: int, group_size: int | None
) -> np.ndarray:
    """``q = clip(rint(w / alpha) + z, 0, 2^c - 1)`` in float32, round half to even."""
    w = np.asarray(w, dtype=np.float32)
    cols = w.shape[1]
    a = expand_groups(np.asarray(scale, np.float32), cols, group_size)
    z = expand_groups(np.asarray(zero, np.float32), cols, group_size)
    q = np.rint(w / a) + z
    return np.clip(q, 0, code_max(code_bits)).astype(np.uint8 if code_bits <= 8 else np.uint16)


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
