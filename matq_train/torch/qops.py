"""The numerics module's quantization formulas as torch operations, so QAT runs on the training device.

Each function is a line-for-line transcription of its ``matq_format.numerics`` reference, with the
same dtypes and the same order of IEEE operations (float64 for the MinMax parameters, float32 for
codes and dequantization), so the results are identical bit for bit on any device;
``tests/test_train.py`` compares every function with its reference, edge cases included (zero rows,
one-sign groups, ragged last groups, every code and width). The formulas themselves stay defined in
numerics; a change there must be mirrored here, and the tests say where.
"""

from __future__ import annotations

import torch

from matq_format import numerics

__all__ = [
    "as_matrix",
    "dequantize",
    "from_matrix",
    "group_minmax",
    "minmax_params",
    "quantize",
    "round_scale",
    "slice_c_scale",
]


def round_scale(alpha: torch.Tensor, dtype: str) -> torch.Tensor:
    """``numerics.round_scale`` of positive float32 scales: nearest in ``dtype``, then up one step if below."""
    alpha = alpha.to(torch.float32)
    if dtype == "F32":
        return alpha
    if dtype == "F16":
        r = alpha.to(torch.float16)
        up = (r.view(torch.int16) + 1).view(torch.float16)  # next float16 toward +inf (r > 0)
        return torch.where(r.to(torch.float32) < alpha, up, r).to(torch.float32)
    if dtype == "BF16":
        bits = alpha.view(torch.int32)
        trunc = bits & -65536  # 0xFFFF0000
        return (trunc + ((trunc != bits).to(torch.int32) << 16)).view(torch.float32)
    raise ValueError(f"unknown scale dtype {dtype}")


def group_minmax(w: torch.Tensor, group_size: int | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``numerics.group_minmax``: float32 min and max per row and group, the last group edge-padded."""
    w = w.detach().to(torch.float32)
    rows, cols = w.shape
    g = cols if group_size is None else min(group_size, max(cols, 1))
    pad = (-cols) % g
    if pad:
        w = torch.cat([w, w[:, -1:].expand(rows, pad)], dim=1)
    wg = w.reshape(rows, -1, g)
    return wg.amin(dim=2), wg.amax(dim=2)


def _alpha_for_zero(lo, hi, z, qmax: int) -> torch.Tensor:
    # Python scalars, not tensors made from them: a scalar tensor on CUDA is a blocking copy.
    up = torch.where(hi > 0, hi / (qmax - z), 0.0)
    down = torch.where(lo < 0, -lo / z, 0.0)
    up = torch.where((hi > 0) & (z >= qmax), float("inf"), up)
    down = torch.where((lo < 0) & (z <= 0), float("inf"), down)
    return torch.maximum(up, down)


def minmax_params(
    w: torch.Tensor,
    code_bits: int,
    group_size: int | None,
    *,
    symmetric: bool = False,
    scale_dtype: str = "F16",
) -> tuple[torch.Tensor, torch.Tensor]:
    """``numerics.minmax_params`` (zero multiple 1): scale and zero point ``float32 [rows, groups]``."""
    lo32, hi32 = group_minmax(w, group_size)
    lo = torch.clamp_max(lo32, 0.0).to(torch.float64)
    hi = torch.clamp_min(hi32, 0.0).to(torch.float64)
    qmax = numerics.code_max(code_bits)
    if symmetric:
        z = torch.full_like(lo, float(1 << (code_bits - 1)))
    else:
        span = hi - lo
        pos = span > 0
        z0 = torch.where(pos, -lo / torch.where(pos, span, 1.0) * qmax, 0.0)
        z = torch.clamp(torch.round(z0), 0, qmax)
        best = _alpha_for_zero(lo, hi, z, qmax)
        for zc in (torch.floor(z0), torch.ceil(z0)):  # rint gave 0 or qmax with the other side nonzero
            zc = torch.clamp(zc, 0, qmax)
            a = _alpha_for_zero(lo, hi, zc, qmax)
            take = ~torch.isfinite(best) & (a < best)
            z, best = torch.where(take, zc, z), torch.where(take, a, best)
    alpha = _alpha_for_zero(lo, hi, z, qmax)
    alpha = torch.where(alpha > 0, alpha, torch.ones_like(alpha))
    alpha = torch.where(torch.isfinite(lo) & torch.isfinite(hi), alpha, torch.full_like(alpha, float("nan")))
    return round_scale(alpha.to(torch.float32), scale_dtype), z.to(torch.float32)


def expand(p: torch.Tensor, cols: int, group_size: int | None) -> torch.Tensor:
    """``numerics.expand_groups``: per-group parameters ``[rows, groups]`` broadcast over ``[rows, cols]``."""
    if group_size is None:
        return p[:, :1]
    return torch.repeat_interleave(p, group_size, dim=1)[:, :cols]


def quantize(
    w: torch.Tensor, alpha: torch.Tensor, zero: torch.Tensor, code_bits: int, group_size
) -> torch.Tensor:
    """``numerics.quantize``: codes ``clamp(rint(w / alpha) + z, 0, 2^c - 1)`` as uint8 (float32 arithmetic)."""
    cols = w.shape[1]
    q = torch.round(w.detach().to(torch.float32) / expand(alpha, cols, group_size))
    q += expand(zero, cols, group_size)
    return q.clamp_(0, numerics.code_max(code_bits)).to(torch.uint8)


def slice_c_scale(q: torch.Tensor, code_bits: int, bits: int, extra_precision: bool = False) -> torch.Tensor:
    """``numerics.slice_codes_c_scale`` as float32: ``S(q, r) = k * 2^(c-r)``, clamped unless extra precision."""
    if bits == code_bits:
        return q.to(torch.float32)
    s = code_bits - bits
    qi = q.to(torch.int32)
    k = (qi >> s) + ((qi >> (s - 1)) & 1)
    if not extra_precision:
        k = torch.clamp_max(k, numerics.code_max(bits))
    return k.to(torch.float32) * float(1 << s)


def dequantize(q, alpha, zero, code_bits: int, bits: int, group_size, extra_precision: bool = False):
    """``numerics.dequantize``: ``alpha * (S(q, r) - z)`` in float32, ``[rows, cols]``."""
    cols = q.shape[1]
    kf = slice_c_scale(q, code_bits, bits, extra_precision)
    return expand(alpha, cols, group_size) * (kf - expand(zero, cols, group_size))


def as_matrix(w: torch.Tensor, input_axis: int = -1) -> torch.Tensor:
    """``numerics.as_matrix``: a stack of matrices as ``[rows, cols]``, its input axis last and every
    other axis folded into rows (differentiable; a view when the input axis is already last)."""
    w = torch.movedim(w, input_axis, -1)
    return w.reshape(-1, w.shape[-1]) if w.ndim != 2 else w


def from_matrix(m: torch.Tensor, shape, input_axis: int = -1) -> torch.Tensor:
    """``numerics.from_matrix``: ``[rows, cols]`` back to ``shape`` (differentiable)."""
    axis = input_axis % len(shape)
    moved = tuple(d for i, d in enumerate(shape) if i != axis) + (shape[axis],)
    return torch.movedim(m.reshape(moved), -1, axis)
