"""Width switching in place (``model.matq.switch``) beside a fresh load of the same width and beside
one unpack of the planes that width needs, all measured in one run; and the memory the model holds.

A Llama-shaped model (random init, every linear layer quantized, MinMax, groups of 128) is written
to a temporary folder by a child process (so its memory does not count here), loaded once with
``matq_torch.load``, then switched 8 -> 2 -> 4 -> 8. Peak RSS is read before any fresh load.

    python bench/switch.py [--hidden 1024] [--layers 8] [--repeat 3] [--threads 2]
"""

from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def build(folder: Path, hidden: int, layers: int) -> Path:
    """A bf16 Llama-shaped HF folder and its matq checkpoint (all linear layers)."""
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
    import tiny_models

    from matq_converters.importers.hf.quantize import quantize_hf

    cfg = tiny_models.config(
        "llama",
        vocab_size=8192,
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=hidden // 128,
        tie_word_embeddings=False,
    )
    tiny_models.build(cfg, folder / "hf", dtype="bfloat16")
    return quantize_hf(folder / "hf", folder / "ck", layers="linear")


def mem() -> dict[str, float]:
    """MiB of private and file-backed resident memory, and the peak RSS so far (``/proc/self/status``)."""
    out = {}
    for line in Path("/proc/self/status").read_text().splitlines():
        key, _, value = line.partition(":")
        if key in ("RssAnon", "RssFile", "VmHWM"):
            out[key] = int(value.split()[0]) / 1024
    return out


def best(fn, repeat: int) -> float:
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return min(times)


def unpack_all(model, bits: int) -> None:
    """One unpack of every quantized tensor at ``bits`` from the planes the model holds (no dequantization)."""
    from matq_format import numerics
    from matq_format.planes import unpack

    m = model.matq
    need = numerics.planes_needed(m.code_bits, bits)
    for t in m.tensors.values():
        planes = getattr(t.module, f"{t.attr}_matq_planes").numpy()
        unpack(
            [planes[i] if i in need else None for i in range(m.code_bits)], t.param.numel(), m.code_bits, bits
        )


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--build-only", type=Path, help=argparse.SUPPRESS)
    a = ap.parse_args()
    if a.build_only:
        build(a.build_only, a.hidden, a.layers)
        return
    import torch

    import matq_format as mf
    import matq_torch

    torch.set_num_threads(a.threads)
    with tempfile.TemporaryDirectory(prefix="matq-switch-") as tmp:
        cmd = [
            sys.executable,
            __file__,
            "--build-only",
            tmp,
            "--hidden",
            str(a.hidden),
            "--layers",
            str(a.layers),
        ]
        subprocess.run(cmd, check=True)
        ckpt = mf.open(Path(tmp) / "ck")
        n_q = sum(ckpt.info(n).numel for n in ckpt.quantized_names())
        base = mem()
        model = matq_torch.load(ckpt, bits=8)
        loaded = mem()
        held = model.matq.nbytes()
        ids = torch.randint(0, 8192, (1, 16))
        rows = []
        for prev, bits in ((8, 2), (2, 4), (4, 8)):

            def switch(prev=prev, bits=bits):
                model.matq.switch(bits=prev)
                t0 = time.perf_counter()
                model.matq.switch(bits=bits)
                return time.perf_counter() - t0

            t_switch = min(switch() for _ in range(a.repeat))
            with torch.no_grad():
                model(ids)
            t_unpack = best(lambda bits=bits: unpack_all(model, bits), a.repeat)
            rows.append((prev, bits, t_switch, t_unpack))
        switched = mem()
        t_fresh = {b: best(lambda b=b: matq_torch.load(ckpt, bits=b), 1) for b in (2, 4, 8)}
    mib = 1 << 20
    print(
        f"{n_q / 1e6:.1f} M quantized weights ({a.layers} layers, hidden {a.hidden}); float32; "
        f"{a.threads} torch threads; best of {a.repeat}"
    )
    print("| switch | switch s | one unpack of the planes s | fresh load s | switch / unpack |")
    print("|---|---|---|---|---|")
    for prev, bits, ts, tu in rows:
        print(f"| {prev} -> {bits} | {ts:.3f} | {tu:.3f} | {t_fresh[bits]:.2f} | {ts / tu:.1f} |")
    print(
        f"held: planes {held['planes'] / mib:.0f} MiB, scales+zeros {held['scales_zeros'] / mib:.0f} MiB, "
        f"float weights served {held['float_weights'] / mib:.0f} MiB (one float32 copy of the quantized "
        f"weights: {4 * n_q / mib:.0f} MiB)"
    )
    for label, m in (("before load", base), ("after load", loaded), ("after the switches", switched)):
        print(
            f"{label}: private (RssAnon) {m['RssAnon']:.0f} MiB, file-backed {m['RssFile']:.0f} MiB, "
            f"peak RSS so far {m['VmHWM']:.0f} MiB"
        )


if __name__ == "__main__":
    np.seterr(all="ignore")
    main()
