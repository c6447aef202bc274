"""ggml's block parameters for a MatQuant slice, and ggml's decode formulas (the references the GGUF
encoders in :mod:`.blocks` are tested against).

A width-r slice ``w = alpha * (k * 2^s - z)`` becomes a ggml block by choosing the block's fp16
scale (and minimum) so that ggml's one rounded product reproduces ``numerics.dequantize_codes``.
"""

from __future__ import annotations

import numpy as np

from matq_format.numerics import fp16_round


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
    integers ``|sc| <= max_mult`` with ``b * sc`` nearest each target (``sc`` takes the target's
    sign: Q3_K and Q6_K store signed sub-block scales; the unsigned types are given none below 0).

    The largest target takes the largest multiplier that makes every product of its row exact, if
    one does; otherwise ``max_mult`` (the finest steps), and each sub-block is rounded to its
    nearest multiple. Rows of zeros get ``b = 0``.
    """
    t = np.asarray(target, np.float32)
    top = np.abs(t).max(axis=1, initial=0)

    def fit(n: int):
        with np.errstate(divide="ignore", invalid="ignore", over="ignore"):
            b = fp16_round(top / np.float32(n))
            sc = np.where(b[:, None] > 0, np.rint(t / b[:, None]), 0)
        sc = np.clip(np.nan_to_num(sc), -max_mult, max_mult)
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
