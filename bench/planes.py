"""Bit-plane pack/unpack throughput beside numpy.copyto of the same bytes, measured in one run.

Targets (issue 2): unpacking a width-4 slice at >= 1/4 of copy speed, packing at >= 1/8.

    python bench/planes.py [--mweights 64] [--repeat 7]
"""

from __future__ import annotations

import argparse
import time

import numpy as np

from matq_format import numerics, planes


def best_rate(fn, n: int, repeat: int) -> float:
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - t0)
    return n / best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--mweights", type=int, default=64, help="millions of weights (one byte each as codes)")
    ap.add_argument("--repeat", type=int, default=7)
    ap.add_argument("--code-bits", type=int, default=8)
    a = ap.parse_args()
    n = a.mweights * (1 << 20)
    c = a.code_bits
    rng = np.random.default_rng(0)
    codes = rng.integers(0, 1 << c, n, dtype=np.uint8)
    dst = np.empty_like(codes)
    packed = planes.pack(codes, c)
    out = np.empty(n, dtype=np.uint8)
    print(f"kernel compiled: {planes.HAVE_KERNEL}; {n / 1e6:.0f}M weights, c={c}, best of {a.repeat}")

    copy = best_rate(lambda: np.copyto(dst, codes), n, a.repeat)
    rows = [("numpy.copyto (same bytes)", copy, None)]
    stride = planes.plane_stride(n)
    pack_out = np.empty((c, stride), dtype=np.uint8)
    if planes.HAVE_KERNEL:
        rows.append(
            ("pack c planes", best_rate(lambda: planes._kernel.pack(codes, c, pack_out), n, a.repeat), 1 / 8)
        )
    rows.append(
        ("pack (numpy fallback)", best_rate(lambda: planes.pack(codes, c, use_kernel=False), n, 1), None)
    )
    for r, ep in ((8, False), (6, False), (4, False), (4, True), (3, False), (2, False), (2, True)):
        if r > c:
            continue
        need = numerics.planes_needed(c, r)
        pl = [packed[k] if k in need else None for k in range(c)]
        label = f"unpack width {r}{' +extra' if ep else ''} ({len(need)} planes)"
        if planes.HAVE_KERNEL:
            fn = lambda pl=pl, r=r, ep=ep: planes._kernel.unpack(pl, n, c, r, ep, out)  # noqa: E731
            rows.append((label, best_rate(fn, n, a.repeat), 1 / 4 if (r, ep) == (4, False) else None))
        if (r, ep) == (4, False):
            rows.append(
                (
                    label + " (numpy fallback)",
                    best_rate(lambda pl=pl: planes.unpack(pl, n, c, 4, use_kernel=False), n, 1),
                    None,
                )
            )
    print(f"{'operation':44s} {'Gweights/s':>11s} {'x copy':>8s}  target")
    ok = True
    for label, rate, target in rows:
        ratio = rate / copy
        mark = ""
        if target is not None:
            met = ratio >= target
            ok &= met
            mark = f">= {target:.3f} {'met' if met else 'MISSED'}"
        print(f"{label:44s} {rate / 1e9:11.3f} {ratio:8.3f}  {mark}")
    print("all targets met" if ok else "some targets missed")


if __name__ == "__main__":
    main()
