"""Every formula of matq, defined once. Exporters, the reader and the trainer all call these.

Notation (spec/v1 section "Numerics"): ``c`` code bits, ``r`` served bits, ``s = c - r``,
``q`` the c-bit code, ``k`` the sliced code in the r-bit domain, ``alpha`` the scale, ``z`` the
zero point on the c-bit scale. All arithmetic is float32 in the order written here; exports that
claim bit-exactness are checked against these functions.

Mirrors: code that repeats a formula here for speed or for another framework, and the test that
holds it to this module bit for bit (a change here changes them all).

- ``group_minmax``, ``minmax_params`` (via ``minmax_params_from_range``), ``quantize``, and their
  BF16 inputs: ``_quantkernel.c``. tests/test_planes.py
  ``test_quantize_kernel_matches_numpy_reference``, ``test_params_kernel_matches_numpy_reference``,
  ``test_params_kernel_rounds_every_float16_neighbourhood_like_numpy``,
  ``test_bf16_kernels_match_widening_to_float32``.
- ``slice_codes`` (with extra precision) on packed planes: ``_bitplanes.c`` (via ``planes.unpack``).
  tests/test_planes.py ``test_unpack_kernel_matches_numpy_and_numerics``, ``test_every_width_exhaustive``.
- ``round_scale``, ``group_minmax``, ``minmax_params``, ``expand_groups``, ``quantize``,
  ``slice_codes_c_scale``, ``dequantize``, ``as_matrix``, ``from_matrix`` in torch: matq_train/torch/qops.py
  (used by matq_train/torch/fakequant.py). tests/test_train_core.py ``test_torch_minmax_and_codes_equal_numerics``,
  ``test_torch_round_scale_equals_numerics``, ``test_torch_stack_views_equal_numerics``; tests/test_train.py
  ``test_slice_ste_matches_numerics_for_every_code``, ``test_minmax_fake_weight_equals_numerics_dequantize``.
- ``slice_codes_c_scale`` and ``dequantize`` in JAX (parameters and codes come from here, on the
  host): matq_train/jax/fakequant.py. tests/test_train_jax.py ``test_jax_fake_weights_equal_numerics``.
- ``dequantize_codes`` row by row: matq_torch/loader.py ``dequantize_rows``. tests/test_torch_switch.py
  ``test_fast_dequantize_is_the_reference_bit_for_bit``.
- ``minmax_params``, ``slice_codes_c_scale``, ``dequantize_codes`` inside GPTQ's column loop, and
  ``nest_scales``: matq_converters/importers/hf/gptq.py. tests/test_gptq.py
  ``test_identity_hessian_is_numerics_multiwidth_rounding``, ``test_table_is_numerics_envelope``.
- ``dequantize_codes`` as ggml's block parameters and decoders (``ggml_affine_params``,
  ``ggml_k_params``, ``dequantize_*_reference``): matq_converters/exporters/gguf/params.py.
  tests/test_gguf_export.py ``test_every_type_decodes_to_the_numerics_reference``.
- ``dequantize_width`` as ggml's Q2_K/Q3_K/Q4_K/Q5_K decoders (levels, ``d*sc``, ``dmin*mn``):
  matq_converters/exporters/gguf/blocks.py ``encode_width``. tests/test_width_params.py
  ``test_gguf_k_blocks_decode_to_dequantize_width``.
"""

from __future__ import annotations

import ml_dtypes
import numpy as np

from . import constants as C

_BF16 = np.dtype(ml_dtypes.bfloat16)

try:
    from . import _quantkernel as _qk
except ImportError:  # pragma: no cover - no compiler at install time
    _qk = None

HAVE_KERNEL = _qk is not None
"""Whether the compiled quantize kernel (``_quantkernel.c``) loaded."""
USE_KERNEL = True
"""Use the compiled kernels (group min/max, quantize) when present; tests turn this off to compare
with the numpy code below, which is the reference (the kernels must give identical results)."""

__all__ = [
    "check_width",
    "code_max",
    "expand_groups",
    "as_matrix",
    "from_matrix",
    "param_shape",
    "minmax_params",
    "quantize",
    "slice_codes",
    "slice_codes_c_scale",
    "dequantize_codes",
    "dequantize",
    "dequantize_width",
    "width_offset",
    "round_scale",
    "extra_bucket_share",
    "bits_per_weight",
    "planes_needed",
    "fp16_round",
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


def expand_groups(p: np.ndarray, cols: int, group_size: int | None, axis: int = -1) -> np.ndarray:
    """Broadcast per-group parameters (``groups`` along ``axis``, e.g. ``[rows, groups]``) to ``cols``
    along that axis (a size-1 axis that broadcasts, for one group per row)."""
    if group_size is None:
        return np.take(p, [0], axis=axis)
    # Indexing, not np.repeat: a group size far larger than cols must not allocate rows*group_size.
    return np.take(p, np.arange(cols) // group_size, axis=axis)


def param_shape(shape: tuple[int, ...], group_size: int | None, input_axis: int = -1) -> tuple[int, ...]:
    """Shape of a quantized tensor's scales and zero points: its own with the input axis counted in
    groups (``[rows, groups]`` for a linear weight ``[rows, cols]``; spec 5.5 and 10.5)."""
    axis = input_axis % len(shape)
    return tuple(n_groups(d, group_size) if i == axis else d for i, d in enumerate(shape))


def as_matrix(a: np.ndarray, input_axis: int = -1) -> np.ndarray:
    """A stack of matrices as one ``[rows, cols]`` matrix, its input axis last and every other axis
    folded into rows: a view when the input axis is already last (spec 10.5)."""
    a = np.moveaxis(a, input_axis, -1)
    return a.reshape(-1, a.shape[-1]) if a.ndim != 2 else a


def from_matrix(m: np.ndarray, shape: tuple[int, ...], input_axis: int = -1) -> np.ndarray:
    """The inverse of :func:`as_matrix`: ``[rows, cols]`` back to ``shape`` (C-contiguous)."""
    axis = input_axis % len(shape)
    moved = tuple(d for i, d in enumerate(shape) if i != axis) + (shape[axis],)
    return np.ascontiguousarray(np.moveaxis(m.reshape(moved), -1, axis))


def importance_shape(shape: tuple[int, ...], input_axis: int = -1) -> tuple[int, ...]:
    """Shape of a tensor's importance (spec 10.8): its shape without the output axis (the other of
    the last two), so ``[cols]`` for a matrix and ``[experts, cols]`` for a stack of them."""
    n = len(shape)
    out_axis = n - 1 if input_axis % n == n - 2 else n - 2
    return tuple(d for i, d in enumerate(shape) if i != out_axis)


def sensitivity_shape(shape: tuple[int, ...], input_axis: int = -1) -> tuple[int, ...]:
    """Shape of a tensor's sensitivity (spec 10.8): its shape without the input axis, so ``[rows]``
    for a matrix and ``[experts, rows]`` for a stack of them."""
    axis = input_axis % len(shape)
    return tuple(d for i, d in enumerate(shape) if i != axis)


def weighted_sq_error(
    d: np.ndarray, importance: np.ndarray | None, input_axis: int = -1, sensitivity: np.ndarray | None = None
) -> float:
    """The error of an encoding, ``d`` = decoded - reference: ``sum importance[col] * d^2`` over every
    element, i.e. the expected squared output error of the layer on the activations the importance
    came from (llama.cpp's imatrix-weighted error). With a ``sensitivity`` (per output feature, the
    mean squared loss gradient there), ``sum sensitivity[row] * importance[col] * d^2``: twice the
    expected rise of the loss per token (spec 10.8, a diagonal Fisher in K-FAC's factored form),
    comparable across tensors. Without importance, the plain ``sum d^2``. float64 sums."""
    d = np.asarray(d, np.float64)
    if importance is None:
        return float(np.dot(d.ravel(), d.ravel()))
    sq = np.moveaxis(d * d, input_axis, -1)  # [..., out, in]
    if sensitivity is not None:
        sq = sq * np.asarray(sensitivity, np.float64)[..., None]  # [..., out]: the sensitivity's shape
    per_col = sq.sum(axis=-2)  # [..., in]: the importance's own shape
    return float(np.dot(per_col.ravel(), np.asarray(importance, np.float64).ravel()))


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
    input_axis: int = -1,
) -> np.ndarray:
    """``w = alpha * (k * 2^s - z)``, all float32: the reference every reader and export matches.

    ``k`` is ``[rows, cols]``, or a stack of matrices whose groups run along ``input_axis`` (10.5)."""
    cols = k.shape[input_axis]
    a = expand_groups(np.asarray(scale, np.float32), cols, group_size, input_axis)
    z = expand_groups(np.asarray(zero, np.float32), cols, group_size, input_axis)
    w = k.astype(np.float32)  # the same float32 operations, in place
    w *= np.float32(1 << (code_bits - bits))
    w -= z
    w *= a
    return w


def dequantize(
    q: np.ndarray,
    scale: np.ndarray,
    zero: np.ndarray,
    code_bits: int,
    bits: int,
    group_size: int | None,
    extra_precision: bool = False,
    input_axis: int = -1,
) -> np.ndarray:
    """Slice full codes to ``bits`` and dequantize."""
    k = slice_codes(q, code_bits, bits, extra_precision)
    return dequantize_codes(k, scale, zero, code_bits, bits, group_size, input_axis)


def width_offset(sc: np.ndarray, bits: int, symmetric: bool) -> np.ndarray:
    """``o`` of spec 10.7: ``2^(r-1)`` without a minimum; with one, 0, or ``2^r - 1`` where ``sc < 0``
    (a negative sub-group scale reverses its codes, as a K-quant level ``2^r - 1 - k``)."""
    sc = np.asarray(sc)
    if symmetric:
        return np.full(sc.shape, 1 << (bits - 1), np.int32)
    return np.where(sc < 0, np.int32(code_max(bits)), np.int32(0))


def dequantize_width(
    k: np.ndarray,
    d: np.ndarray,
    sc: np.ndarray,
    dmin: np.ndarray | None,
    mn: np.ndarray | None,
    bits: int,
    group_size: int,
    input_axis: int = -1,
    super_block: int = C.WIDTH_SUPER_BLOCK,
) -> np.ndarray:
    """A width's own block parameters (spec 10.7): ``w = step * (k - o) - low`` in float32 with
    ``step = d * sc`` and ``low = dmin * mn`` (both exact), ``t = step * (k - o)`` rounded once and
    ``w = t - low`` rounded once, the order ggml's K-quant decoders use. ``d``/``dmin`` are per
    super-block of ``super_block`` columns, ``sc``/``mn`` per sub-group of ``group_size``; no ``dmin``: no minimum."""
    cols = k.shape[input_axis]
    symmetric = dmin is None
    sc_e = expand_groups(np.asarray(sc), cols, group_size, input_axis)
    d_e = expand_groups(np.asarray(d, np.float32), cols, super_block, input_axis)
    step = d_e * sc_e.astype(np.float32)
    x = (k.astype(np.int32) - width_offset(sc_e, bits, symmetric)).astype(np.float32)
    t = step * x
    if symmetric:
        return t.astype(np.float32)
    dmin_e = expand_groups(np.asarray(dmin, np.float32), cols, super_block, input_axis)
    mn_e = expand_groups(np.asarray(mn), cols, group_size, input_axis).astype(np.float32)
    return (t - dmin_e * mn_e).astype(np.float32)


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


# --- scales that GGUF (ggml) blocks hold exactly ---------------------------------------------------
# A width-r slice is w = alpha * (k * 2^s - z). ggml types hold it as integer levels per block with
# fp16 block parameters. The scales below are chosen so that they can: fp16 rounding, signed group
# scales, nested K-quant scales. ggml's block parameters themselves and the float32 order of its
# decoder live in matq_converters/exporters/gguf/params.py.


def fp16_round(x: np.ndarray) -> np.ndarray:
    """float32 rounded to the nearest float16 (ties to even), returned as float32; inf on overflow."""
    with np.errstate(over="ignore"):
        return np.asarray(x, np.float32).astype(np.float16).astype(np.float32)


def extreme_signs(w: np.ndarray, group_size: int | None) -> np.ndarray:
    """Per row and group, -1 where the largest-magnitude weight is positive, else +1.

    A symmetric grid (z = 2^(c-1)) reaches one step further below z than above it. Multiplying
    the group's scale by this sign puts its largest-magnitude weight on code 0, the one value every
    slice holds exactly (slicing rounds the others toward a coarser grid and clamps the top),
    as llama.cpp's Q4_0 does with its signed block scale. Quantizing ``w * sign`` with a positive
    scale gives the same codes as ``w`` with the signed scale.
    """
    lo, hi = group_minmax(w, group_size)
    return np.where(hi > -lo, np.float32(-1), np.float32(1))


SIGN_SPAN = 64
"""Columns per scale sign in rows that are not a multiple of ``NEST_BLOCK``: llama.cpp's Q2_0 block."""


def sign_span(cols: int, group_size: int) -> int:
    """Columns that share one scale sign in the gguf layout: ``SIGN_SPAN`` for groups that tile it in
    rows no K-quant holds (they export as one-step blocks, Q2_0 at int2), else the group itself."""
    if cols % NEST_BLOCK and cols % SIGN_SPAN == 0 and SIGN_SPAN % group_size == 0:
        return SIGN_SPAN
    return group_size


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
    sign = np.where(a < 0, -1.0, 1.0)  # signed scales nest by magnitude and keep their sign
    per = np.abs(a).reshape(rows, cols // NEST_BLOCK, NEST_BLOCK // group_size).astype(np.float64)
    need = per.max(axis=2, keepdims=True) / NEST_MULT
    exp = np.floor(np.log2(np.where(need > 0, need, 1.0))) - 6  # 7 significant bits: D = k * 2^exp
    d = np.ceil(need / np.exp2(exp)) * np.exp2(exp)
    m = np.clip(np.ceil(per / d), 1, NEST_MULT)
    return round_scale((d * m).reshape(rows, -1).astype(np.float32), "F16") * sign.astype(np.float32)
