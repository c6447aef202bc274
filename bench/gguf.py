"""matq's GGUF export against llama.cpp's own path, side by side on one checkpoint.

    python bench/gguf.py                       # Llama-shaped, per channel, int4 and int2
    python bench/gguf.py --group-size 128      # per group of 128 (matq then writes Q4_1)
    python bench/gguf.py --zero-multiple 16    # zero points that make every K-quant slice bit-exact

matq path: ``matq convert --to gguf --bits R`` (sliced codes become ggml levels, nothing is
re-quantized). llama.cpp path, what a user does today: materialize the width-R slice as an f16
GGUF (the weights convert_hf_to_gguf.py would write), then ``llama_model_quantize`` to Q4_1 / Q2_K
(pure: every linear layer at that type; embeddings and output kept f16 in both files). Reported per
path: wall time (end to end from the checkpoint), file size, and the error of the decoded weights
against the MatQuant slice itself (``ckpt.dequantize(name, R)``).

The checkpoint is a Llama-shaped model with random weights (transformers init), MinMax-quantized
per channel (or per group) with matq_format.numerics; its tokenizer is trained on the spot. Timings
are wall-clock on whatever machine runs this; run it alone.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import logging
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
# this file is named gguf.py: keep its folder off the path so `import gguf` finds the package
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]
sys.path.insert(0, str(ROOT / "tests"))  # the tiny-model builders the GGUF tests use

import gguf  # noqa: E402
import llama_cpp  # noqa: E402
from gguf_helpers import to_matq  # noqa: E402
from tiny_models import build, byte_level_bpe, config  # noqa: E402

import matq_format as mf  # noqa: E402
from matq_converters import registry  # noqa: E402
from matq_converters.registry import ConvertOptions  # noqa: E402
from matq_eval.llama import quiet_stderr  # noqa: E402

LLAMA_FTYPE = {4: ("Q4_1", llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_1), 2: ("Q2_K", llama_cpp.LLAMA_FTYPE_MOSTLY_Q2_K)}
GGML_TYPE_F16 = 1


def build_model(folder: Path, hidden: int, layers: int, seed: int) -> Path:
    """A Llama-shaped transformers model with random weights and a trained byte-level BPE tokenizer."""
    import transformers as tf

    raw = byte_level_bpe("llama3", 2048)
    tok = tf.PreTrainedTokenizerFast(
        tokenizer_object=raw, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
    )
    cfg = config(
        "llama",
        vocab_size=raw.get_vocab_size(),
        hidden_size=hidden,
        intermediate_size=hidden * 11 // 4 // 256 * 256,
        num_hidden_layers=layers,
        num_attention_heads=hidden // 64,
        num_key_value_heads=max(1, hidden // 256),
        max_position_embeddings=2048,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        tie_word_embeddings=False,
    )
    return build(cfg, folder, seed=seed, tokenizer=tok)


def llama_cpp_quantize(src: Path, dst: Path, ftype: int, threads: int) -> None:
    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = ftype
    p.nthread = threads
    p.pure = True
    p.token_embedding_type = GGML_TYPE_F16
    p.output_tensor_type = GGML_TYPE_F16
    with quiet_stderr():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize failed with {rc}")


def weight_error(path: Path, ref: dict[str, np.ndarray]) -> dict:
    """Decoded weights of every quantized tensor against the MatQuant slice (``ref``: GGUF name ->
    the slice in GGUF row order, from an F32 export)."""
    sq_err = sq_ref = 0.0
    worst = 0.0
    same = total = 0
    types = set()
    for t in gguf.GGUFReader(path).tensors:
        if t.name not in ref:
            continue
        want = ref[t.name]
        got = gguf.quants.dequantize(t.data, t.tensor_type).reshape(want.shape)
        d = (got - want).astype(np.float64)
        sq_err += float(np.dot(d.ravel(), d.ravel()))
        sq_ref += float(np.dot(want.ravel().astype(np.float64), want.ravel()))
        worst = max(worst, float(np.abs(d).max()))
        same += int(np.count_nonzero(got == want))
        total += want.size
        types.add(gguf.GGMLQuantizationType(t.tensor_type).name)
    return {
        "types": "+".join(sorted(types)),
        "rel_rms_error": (sq_err / sq_ref) ** 0.5,
        "max_abs_error": worst,
        "identical_share": same / total,
    }


def slice_reference(conv, ckpt: mf.Checkpoint, bits: int, path: Path) -> dict[str, np.ndarray]:
    """GGUF name -> the width-``bits`` slice in GGUF row order (an F32 export of the slices)."""
    settings = {"outtype": "f32", "float_slices": "f32"}
    res = conv.convert(ckpt, path, ConvertOptions(bits=bits, overwrite=True, settings=settings))
    keep = set(res.details["widths"])
    ref = {t.name: np.array(t.data) for t in gguf.GGUFReader(path).tensors if t.name in keep}
    path.unlink()
    return ref


def run(args) -> list[dict]:
    work = Path(args.workdir or tempfile.mkdtemp(prefix="matq-bench-gguf-"))
    work.mkdir(parents=True, exist_ok=True)
    hf = work / "hf"
    if not (hf / "config.json").exists():
        build_model(hf, args.hidden, args.layers, args.seed)
    ck = work / f"ck-{args.group_size or 'channel'}-z{args.zero_multiple}{'-sym' if args.symmetric else ''}"
    if not ck.exists():
        to_matq(
            hf, ck, group_size=args.group_size, zero_multiple=args.zero_multiple, symmetric=args.symmetric
        )
    ckpt = mf.open(ck)
    n = sum(ckpt.info(x).numel for x in ckpt.quantized_names())
    print(
        f"checkpoint: {ck.name}: {n / 1e6:.1f} M quantized weights, "
        f"{'group ' + str(args.group_size) if args.group_size else 'per channel'}, "
        f"{'symmetric' if args.symmetric else f'asymmetric, zero points multiples of {args.zero_multiple}'}"
    )
    conv = registry.get("gguf")
    rows = []
    for bits in (4, 2):
        name, ftype = LLAMA_FTYPE[bits]
        out = work / f"matq-int{bits}.gguf"
        t0 = time.perf_counter()
        conv.convert(ckpt, out, ConvertOptions(bits=bits, overwrite=True, settings={"outtype": "f16"}))
        t_matq = time.perf_counter() - t0
        f16 = work / f"slice-int{bits}-f16.gguf"
        q = work / f"llama-cpp-int{bits}-{name}.gguf"
        t0 = time.perf_counter()
        conv.convert(
            ckpt, f16, ConvertOptions(bits=bits, overwrite=True, settings={"outtype": "f16", "float_slices": "f16"})
        )
        t_f16 = time.perf_counter() - t0
        llama_cpp_quantize(f16, q, ftype, args.threads)
        t_llama = time.perf_counter() - t0
        ref = slice_reference(conv, ckpt, bits, work / f"slice-int{bits}-f32.gguf")
        for path, label, secs in ((out, "matq", t_matq), (q, f"llama.cpp f16 -> {name}", t_llama)):
            row = {"width": bits, "path": label, "seconds": secs, "bytes": path.stat().st_size}
            row.update(weight_error(path, ref))
            if label != "matq":
                row["f16_step_seconds"] = t_f16
            rows.append(row)
        f16.unlink()
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--group-size", type=int, default=None)
    ap.add_argument("--zero-multiple", type=int, default=1, help="MinMax zero points on multiples of this.")
    ap.add_argument("--symmetric", action="store_true")
    ap.add_argument(
        "--threads", type=int, default=min(4, os.cpu_count() or 1), help="llama.cpp quantize threads"
    )
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--workdir", help="Reuse or keep files here (default: a temporary folder).")
    ap.add_argument("--keep", action="store_true", help="Keep the work folder.")
    ap.add_argument("--json", action="store_true")
    args = ap.parse_args()
    logging.getLogger("gguf").setLevel(logging.ERROR)
    rows = run(args)
    if args.json:
        print(json.dumps(rows, indent=2))
        return
    print("| width | path | types | wall s | MiB | rel. RMS error vs slice | max abs error | identical |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        print(
            f"| int{r['width']} | {r['path']} | {r['types']} | {r['seconds']:.2f} | {r['bytes'] / 2**20:.1f} "
            f"| {r['rel_rms_error']:.2e} | {r['max_abs_error']:.2e} | {r['identical_share']:.1%} |"
        )


if __name__ == "__main__":
    main()
