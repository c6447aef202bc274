"""Bit-plane codec: c-bit codes <-> c packed planes, and slicing straight from planes.

The compiled kernel (``_bitplanes.c``) is the fast path; the numpy functions here are the
reference it is tested against, and the fallback where no compiler was available at install.
"""

from __future__ import annotations

import numpy as np

from . import constants as C
from .numerics import check_width, planes_needed, slice_codes

try:  # pragma: no cover - exercised implicitly
    from . import _bitplanes as _kernel
except ImportError:  # pragma: no cover
    _kernel = None

HAVE_KERNEL = _kernel is not None


def plane_stride(n: int) -> int:
    """Bytes per plane for ``n`` codes: whole 64-bit words."""
    return -(-n // 64) * C.PLANE_ALIGN_BYTES


def pack(codes: np.ndarray, code_bits: int, *, use_kernel: bool = True) -> np.ndarray:
    """Flattened codes -> ``[c, stride]`` uint8, row k = bit-plane k (LSB-first bytes, zero padded)."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8 and codes.size and (codes.min() < 0 or codes.max() > 255):
        raise ValueError("a code does not fit the code width")  # rather than wrap modulo 256
    flat = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    n = flat.size
    out = np.empty((code_bits, plane_stride(n)), dtype=np.uint8)
    if use_kernel and _kernel is not None and code_bits <= 8:
        _kernel.pack(flat, code_bits, out)
        return out
    if code_bits < 8 and n and int(flat.max()) >> code_bits:
        raise ValueError("a code does not fit the code width")
    padded = np.zeros(plane_stride(n) * 8, dtype=np.uint8)
    padded[:n] = flat
    for k in range(code_bits):
        out[k] = np.packbits((padded >> k) & 1, bitorder="little")
    return out


def pack_into(
    codes: np.ndarray, code_bits: int, out: np.ndarray, first: int, *, use_kernel: bool = True
) -> None:
    """Pack ``codes`` (codes ``first..`` of a tensor) into their words of the planes ``out`` ``[c, stride]``.

    Lets row blocks be packed where they are quantized, while still in cache, and in parallel:
    ``first`` must be a multiple of 64 and every block but the last a whole number of words, so no
    two blocks share a word (the last one's partial word is zero padded, as :func:`pack` does).
    """
    flat = np.ascontiguousarray(codes, dtype=np.uint8).reshape(-1)
    n = flat.size
    if out.dtype != np.uint8 or out.ndim != 2 or out.shape[0] != code_bits or not out.flags.c_contiguous:
        raise ValueError("out must be C-contiguous uint8 [code_bits, stride]")
    if first % 64 or first // 8 + plane_stride(n) > out.shape[1]:
        raise ValueError("codes do not fit the planes at that position")
    if use_kernel and _kernel is not None and code_bits <= 8:
        _kernel.pack(flat, code_bits, out, out.shape[1], first // 64)
        return
    out[:, first // 8 : first // 8 + plane_stride(n)] = pack(flat, code_bits, use_kernel=False)


def unpack(
    planes: list[np.ndarray | None],
    n: int,
    code_bits: int,
    bits: int | None = None,
    extra_precision: bool = False,
    *,
    use_kernel: bool = True,
) -> np.ndarray:
    """Sliced codes ``k`` (r-bit domain, uint8, length n) read from the planes the width needs.

    ``planes[k]`` is plane k or None; only ``planes_needed(c, bits)`` must be present.
    """
    bits = code_bits if bits is None else bits
    check_width(code_bits, bits)
    need = planes_needed(code_bits, bits)
    if len(planes) != code_bits:
        raise ValueError("planes must list c entries")
    missing = [k for k in need if planes[k] is None]
    if missing:
        raise ValueError(f"planes {missing} are needed")
    # Only the planes the width needs are looked at (and handed to the kernel), as contiguous bytes.
    planes = [
        np.ascontiguousarray(p, dtype=np.uint8).reshape(-1) if k in need else None
        for k, p in enumerate(planes)
    ]
    if any(planes[k].size < plane_stride(n) for k in need):
        raise ValueError(f"a plane is shorter than {plane_stride(n)} bytes")
    out = np.empty(n, dtype=np.uint8)
    if use_kernel and _kernel is not None and code_bits <= 8:
        _kernel.unpack(planes, n, code_bits, bits, bool(extra_precision), out)
        return out
    q = np.zeros(n, dtype=np.uint16)
    for k in need:
        q |= np.unpackbits(planes[k], count=n, bitorder="little").astype(np.uint16) << k
    return slice_codes(q, code_bits, bits, extra_precision).astype(np.uint8)
