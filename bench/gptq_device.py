"""Multi-width GPTQ on a device: time per Llama-3-8B-shaped layer, determinism, CPU agreement.

    python bench/gptq_device.py --device cuda            # 8B shapes (one decoder layer's linears)
    python bench/gptq_device.py --device cpu --small     # a quick smoke run of the same script

Prints one JSON object per measurement. The 8B figures: GPTQ of q/k/v (stacked, 6144 x 4096),
o (4096 x 4096), gate/up (stacked, 28672 x 4096), down (4096 x 14336) with a Hessian from random
correlated inputs; a transformers LlamaDecoderLayer of that shape run forward on the calibration
tokens (float32), which a calibration pass does twice per layer; and the tiny test Llama quantized
end to end with ``--calib`` on the device twice (same bytes?) and on the CPU (same codes?).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from matq_converters.importers.hf.gptq import gptq_multiwidth  # noqa: E402
from matq_format.quantspec import QuantizeSpec  # noqa: E402


def emit(**kw) -> None:
    print(json.dumps(kw), flush=True)


def sync(dev) -> None:
    if dev.type == "cuda":
        torch.cuda.synchronize()


def hessian(cols: int, dev, n: int = 4096, seed: int = 0) -> torch.Tensor:
    g = torch.Generator(device="cpu").manual_seed(seed)
    mix = torch.eye(cols) * 0.5 + torch.randn(cols, cols, generator=g) / cols**0.5
    x = (torch.randn(n, cols, generator=g) @ mix).to(dev)
    return (x.T.double() @ x.double()) / n


def time_gptq(dev, shapes, propagate, objective="minmax") -> None:
    spec = QuantizeSpec.build(objective=objective)
    for name, (rows, cols) in shapes.items():
        w = (torch.randn(rows, cols, generator=torch.Generator().manual_seed(1)) * 0.02).to(dev)
        h = hessian(cols, dev)
        sync(dev)
        t = time.perf_counter()
        codes, _, _ = gptq_multiwidth(w, h, spec, propagate=propagate)
        sync(dev)
        emit(what="gptq", linear=name, rows=rows, cols=cols, propagate=propagate, objective=objective,
             seconds=round(time.perf_counter() - t, 3))  # fmt: skip


def determinism(dev) -> None:
    spec = QuantizeSpec.build(objective="multiwidth")
    w = torch.randn(512, 1024, generator=torch.Generator().manual_seed(2)) * 0.02
    h = hessian(1024, torch.device("cpu"))
    for prop in ("mean", "per-width"):
        a = gptq_multiwidth(w.to(dev), h.to(dev), spec, propagate=prop)
        b = gptq_multiwidth(w.to(dev), h.to(dev), spec, propagate=prop)
        c = gptq_multiwidth(w, h, spec, propagate=prop)  # CPU
        emit(what="determinism", propagate=prop, same_bytes_twice=all(x.tobytes() == y.tobytes() for x, y in zip(a, b, strict=True)),
             codes_equal_cpu=float(np.mean(a[0] == c[0])), scales_equal_cpu=float(np.mean(a[1] == c[1])))  # fmt: skip


def layer_forward(dev, tokens: int, hidden=4096, inter=14336) -> None:
    import transformers as tf

    cfg = tf.LlamaConfig(hidden_size=hidden, intermediate_size=inter, num_attention_heads=32,
                         num_key_value_heads=8, num_hidden_layers=1, max_position_embeddings=4096)  # fmt: skip
    with torch.device(dev):
        model = tf.LlamaModel(cfg).eval()
    layer, rot = model.layers[0], model.rotary_emb
    seq, batch = 512, 8
    h = torch.randn(batch, seq, hidden, device=dev) * 0.1
    pos = torch.arange(seq, device=dev)[None]
    pe = rot(h, pos)
    mask = None
    with torch.no_grad():
        layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos)
        sync(dev)
        t = time.perf_counter()
        for _ in range(tokens // (seq * batch)):
            layer(h, attention_mask=mask, position_embeddings=pe, position_ids=pos)
        sync(dev)
    emit(
        what="layer_forward",
        tokens=tokens,
        hidden=hidden,
        inter=inter,
        seconds=round(time.perf_counter() - t, 3),
    )


def end_to_end(dev) -> None:
    from tiny_models import tiny_hf_model

    from matq_converters import roles as architectures
    from matq_converters.importers.hf.calibrated import quantize_calibrated
    from matq_converters.importers.hf.source import HFSource

    tmp = Path(tempfile.mkdtemp())
    hf = tiny_hf_model("llama", tmp / "hf")
    text = tmp / "calib.txt"
    text.write_text(" ".join(f"Sentence {i} reads the top bits of code {i * 7 % 255}." for i in range(400)))
    spec = QuantizeSpec.build()
    src = HFSource(hf)
    sel = set(architectures.select(src.shapes(), "linear", architectures.detect(src.config)))
    outs = {}
    for key, d in (("a", dev), ("b", dev), ("cpu", torch.device("cpu"))):
        t = time.perf_counter()
        outs[key] = quantize_calibrated(src, tmp / key, spec, sel, {"tool": "bench"}, calib=text,
                                        calib_seq_len=128, device=str(d))  # fmt: skip
        emit(what="end_to_end", run=key, device=str(d), seconds=round(time.perf_counter() - t, 2))
    import matq_format as mf

    same = all((outs["a"] / f.name).read_bytes() == f.read_bytes() for f in outs["b"].iterdir())
    ca, cc = mf.open(outs["a"]), mf.open(outs["cpu"])
    ca.verify()
    agree = [float(np.mean(ca.codes(n) == cc.codes(n))) for n in ca.quantized_names()]
    emit(what="end_to_end_compare", same_bytes_twice=same, min_code_agreement_with_cpu=min(agree))


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--device", default="cuda")
    ap.add_argument("--small", action="store_true", help="small shapes (a smoke run)")
    ap.add_argument("--tokens", type=int, default=131072)
    ap.add_argument("--only", default="", help="comma-separated steps (default: all)")
    args = ap.parse_args()
    dev = torch.device(args.device)
    emit(what="env", torch=torch.__version__, cuda=torch.cuda.is_available(),
         device=torch.cuda.get_device_name(dev) if dev.type == "cuda" else "cpu")  # fmt: skip
    if args.small:
        shapes = {"qkv": (384, 256), "down": (256, 512)}
        tokens, hidden, inter = 8192, 256, 512
    else:
        shapes = {"qkv": (6144, 4096), "o": (4096, 4096), "gate_up": (28672, 4096), "down": (4096, 14336)}
        tokens, hidden, inter = args.tokens, 4096, 14336
    steps = {
        "determinism": lambda: determinism(dev),
        "mean": lambda: time_gptq(dev, shapes, "mean"),
        "per-width": lambda: time_gptq(dev, shapes, "per-width"),
        "mean-multiwidth": lambda: time_gptq(dev, shapes, "mean", "multiwidth"),
        "per-width-multiwidth": lambda: time_gptq(dev, shapes, "per-width", "multiwidth"),
        "forward": lambda: layer_forward(dev, tokens, hidden, inter),
        "end-to-end": lambda: end_to_end(dev),
    }
    for name in args.only.split(",") if args.only else steps:
        step = steps[name]
        try:
            step()
        except Exception as exc:  # noqa: BLE001 - report and go on to the next measurement
            emit(what="error", error=f"{type(exc).__name__}: {exc}"[:300])


if __name__ == "__main__":
    main()
