"""A width-``r`` slice in a ``c``-bit integer container, for the exporters whose targets store
``(q - zp) * scale`` (compressed-tensors, ONNX MatMulNBits and DequantizeLinear).

The slice dequantizes as ``alpha * (k * 2^(B-r) - z)`` (``numerics.dequantize_codes``, ``B`` the
checkpoint's code bits). In a container of ``c`` bits the codes are shifted up by ``c - r`` (one
less with extra precision, whose top bucket is ``2^r``), the zero points become ``z / 2^e`` and the
scales ``alpha * 2^e`` with ``e = step_exponent(...)``: ``(q - zp) * scale`` is then the slice bit for
bit in float32, because every product involved is of an integer and a power of two.
"""

from __future__ import annotations

import numpy as np


def step_exponent(code_bits: int, bits: int, ep: bool, c: int) -> int:
    """``e``: a container step is ``2^e`` code steps, the codes shifted up by ``c - bits - ep``."""
    return max(code_bits - c + ep, 0)


def integer_zero_points(zero: np.ndarray, code_bits: int, bits: int, ep: bool, c: int) -> bool:
    """Whether the zero points are integers in a ``c``-bit container (``z / 2^e`` integral)."""
    if not np.all(zero == np.round(zero)):
        return False
    return not np.any(zero.astype(np.int64) % (1 << step_exponent(code_bits, bits, ep, c)))


def container_bits(
    zero: np.ndarray, code_bits: int, bits: int, ep: bool = False, sizes: tuple[int, ...] = tuple(range(1, 9))
) -> int | None:
    """The fewest bits ``c`` among ``sizes`` (at most 8) that hold a width-``bits`` slice with integer
    zero points; None if none does."""
    for c in sizes:
        if bits + ep <= c <= 8 and integer_zero_points(zero, code_bits, bits, ep, c):
            return c
    return None


def container_codes(k: np.ndarray, code_bits: int, bits: int, ep: bool, c: int) -> np.ndarray:
    """Sliced codes ``k`` as ``c``-bit container codes (uint8)."""
    e = step_exponent(code_bits, bits, ep, c)
    return (k.astype(np.uint16) << (code_bits - bits - e)).astype(np.uint8)


def container_scale_zero(
    scale: np.ndarray, zero: np.ndarray, code_bits: int, bits: int, ep: bool, c: int
) -> tuple[np.ndarray, np.ndarray]:
    """float32 scales ``alpha * 2^e`` and zero points ``z / 2^e`` (integers when
    ``integer_zero_points``; float otherwise) of a ``c``-bit container."""
    f = np.float32(1 << step_exponent(code_bits, bits, ep, c))
    return (np.asarray(scale, np.float32) * f), (np.asarray(zero, np.float32) / f)


def pack_bytes(v: np.ndarray, bits: int) -> np.ndarray:
    """Rows of codes (uint8) as the bytes of their little-endian bit stream, ``bits`` per code:
    code ``i`` of a row at bit ``i * bits``. Rows must hold a whole number of bytes."""
    if bits == 8:
        return v
    if 8 % bits == 0:  # whole codes per byte: shift and or, a pass per code in the byte
        per = 8 // bits
        g = v.reshape(len(v), -1, per)
        out = g[:, :, 0].copy()
        for i in range(1, per):
            out |= g[:, :, i] << np.uint8(bits * i)
        return out
    stream = ((v[..., None] >> np.arange(bits, dtype=np.uint8)) & 1).reshape(len(v), -1)
    return np.packbits(stream, axis=1, bitorder="little")
