"""GGUF export time: ``matq convert --to gguf`` against llama.cpp's own convert + quantize, in one run.

    python bench/gguf_speed.py                          # Llama, hidden 1024, 8 layers: 268 MiB of f32
    python bench/gguf_speed.py --hidden 512 --layers 4  # a quick one

A Llama-shaped transformers model with random weights (its own config, a byte-level BPE tokenizer
trained on the spot) is MinMax-quantized once (int8 codes per channel, as ``bench/gguf.py``). Then,
each as a fresh process from the command line, as a user runs them:

- matq: ``matq convert CK --to gguf --bits 4`` (compact: Q4_K) and ``--bits 4 --exact``;
- llama.cpp: ``convert_hf_to_gguf.py HF --outtype f16`` (the float model), then
  ``llama-quantize F16 Q4_K_M`` (``bench/llama_tools.sh`` builds it; ``--llama-quantize`` names one).

Each command runs ``--repeat`` times; the best wall time and the best CPU time (user + system, over
all threads: llama-quantize uses ``--threads``) are kept, as the machine may be shared.
"""

from __future__ import annotations

import argparse
import os
import resource
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # bench/gguf.py is not gguf
sys.path.insert(0, str(ROOT / "tests"))


def build_model(folder: Path, hidden: int, layers: int, seed: int) -> Path:
    """A Llama model of transformers' own config, random weights, with a trained tokenizer."""
    import transformers as tf
    from tiny_models import build, byte_level_bpe, config

    raw = byte_level_bpe("llama3", 2048)
    tok = tf.PreTrainedTokenizerFast(tokenizer_object=raw, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>")
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


def llama_quantize(given: str | None) -> Path:
    """llama-quantize: the one given, else the one ``bench/llama_tools.sh`` builds (or finds cached)."""
    if given:
        return Path(given)
    out = subprocess.run(["bash", str(HERE / "llama_tools.sh")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip()) / "llama-quantize"


CONVERT = """
import runpy, sys
root = sys.argv.pop(1)
sys.path.insert(0, root)
import conversion.base as base
known = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:  # the tokenizer trained here: llama 3's split, unknown hash
        return "llama-bpe"
base.TextModel.get_vocab_base_pre = pre
sys.argv[0] = root + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""
"""``convert_hf_to_gguf.py`` as run from the command line, told the pre-tokenizer of the tokenizer
trained here (llama.cpp recognizes released vocabularies by hash; matq names it from its split)."""


def timed(cmd: list[str], repeat: int, env: dict | None = None) -> tuple[float, float]:
    """Best wall time and best CPU time (user + system, all threads) of ``repeat`` runs of ``cmd``
    (its output hidden unless it fails)."""
    wall = cpu = float("inf")
    for _ in range(repeat):
        before = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.perf_counter()
        r = subprocess.run(cmd, capture_output=True, text=True, env=env)
        wall = min(wall, time.perf_counter() - t0)
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        cpu = min(cpu, after.ru_utime - before.ru_utime + after.ru_stime - before.ru_stime)
        if r.returncode:
            raise SystemExit(f"{' '.join(cmd)} failed:\n{r.stdout}{r.stderr}")
    return wall, cpu


def run(args) -> list[tuple[str, float, float, int]]:
    from gguf_helpers import to_matq

    from matq_converters.exporters.gguf import converter

    work = Path(args.workdir or tempfile.mkdtemp(prefix="matq-bench-gguf-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    hf, ck = work / "hf", work / "ck"
    if not (hf / "config.json").exists():
        build_model(hf, args.hidden, args.layers, args.seed)
    if not ck.exists():
        to_matq(hf, ck)
    mib = sum(f.stat().st_size for f in hf.glob("*.safetensors")) / 2**20
    print(f"model: Llama hidden {args.hidden}, {args.layers} layers, {mib:.0f} MiB of safetensors; "
          f"{os.cpu_count()} CPUs; best of {args.repeat}", flush=True)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    matq = [sys.executable, "-c", "from matq_cli.main import main; main()", "convert", str(ck), "--to", "gguf",
            "--force", "--bits", "4"]
    quant = llama_quantize(args.llama_quantize)
    f16, q4 = work / "llama-f16.gguf", work / "llama-q4_k_m.gguf"
    rows = []
    for label, cmd in (("matq --bits 4 (compact)", [*matq, "-o", str(work / "matq-q4.gguf")]),
                       ("matq --bits 4 --exact", [*matq, "--exact", "-o", str(work / "matq-q4-exact.gguf")])):
        rows.append((label, *timed(cmd, args.repeat, env), Path(cmd[-1]).stat().st_size))
    conv = timed([sys.executable, "-c", CONVERT, str(converter.folder()), str(hf), "--outtype", "f16",
                  "--outfile", str(f16)], args.repeat)
    quantize = timed([str(quant), str(f16), str(q4), "Q4_K_M", str(args.threads)], args.repeat)
    rows.append(("llama.cpp convert_hf_to_gguf.py --outtype f16", *conv, f16.stat().st_size))
    rows.append((f"llama.cpp llama-quantize Q4_K_M ({args.threads} threads)", *quantize, q4.stat().st_size))
    rows.append(("llama.cpp convert + quantize", conv[0] + quantize[0], conv[1] + quantize[1], q4.stat().st_size))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--hidden", type=int, default=1024)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--repeat", type=int, default=2, help="Runs of each command; the best is kept.")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama-quantize threads.")
    ap.add_argument("--llama-quantize", help="Path of llama-quantize (default: bench/llama_tools.sh's).")
    ap.add_argument("--workdir", help="Reuse or keep the model and checkpoint here (default: a temporary folder).")
    ap.add_argument("--keep", action="store_true", help="Keep the work folder.")
    args = ap.parse_args()
    rows = run(args)
    print("| path | wall s | CPU s | MiB |\n|---|---|---|---|")
    for label, wall, cpu, size in rows:
        print(f"| {label} | {wall:.2f} | {cpu:.2f} | {size / 2**20:.1f} |")


if __name__ == "__main__":
    main()
