"""GGUF export time: ``matq convert --to gguf`` beside llama.cpp's convert + quantize, in one run.

    python bench/gguf_speed.py                                          # Llama 3, hidden 1024, 8 layers
    python bench/gguf_speed.py --family Mixtral --hidden 512 --layers 4
    python bench/gguf_speed.py --hf path/to/gemma-3-270m                # a Hugging Face folder as it is

The model is a tiny model of ``tests/tiny_models.FAMILIES`` (transformers' own config, random weights,
a tokenizer trained on the spot) scaled to ``--hidden`` (FFN twice that) and ``--layers``, or the
folder ``--hf`` names. It is quantized once, ``matq quantize --layers linear`` (the int8 checkpoint
serves every width), then each path runs as fresh processes, as a user runs them:

- matq: ``matq convert CK --to gguf --bits 4`` (compact, the default) and ``--bits 4 --exact``;
- llama.cpp: ``convert_hf_to_gguf.py HF --outtype f16``, then ``llama-quantize F16 Q4_K_M``
  (``bench/llama_tools.sh`` builds it; ``--llama-quantize`` names another).

Each command runs ``--repeat`` times; the best wall time and the best CPU time (user + system over
all threads; llama-quantize uses ``--threads``) are kept, as the machine may be shared.
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

CONVERT = """
import runpy, sys
from pathlib import Path
root, matq = sys.argv.pop(1), sys.argv.pop(1)
sys.path.insert(0, root)
import conversion.base as base
known = base.TextModel.get_vocab_base_pre
def pre(self, tokenizer):
    try:
        return known(self, tokenizer)
    except NotImplementedError:  # a vocabulary trained here: named from its split regex, as matq does
        sys.path.insert(0, matq)
        from matq_converters.exporters.gguf.pretokenizer import bpe_pre
        return bpe_pre(Path(sys.argv[1]) / "tokenizer.json")
base.TextModel.get_vocab_base_pre = pre
sys.argv[0] = root + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""
"""``convert_hf_to_gguf.py`` as run from the command line; a BPE vocabulary trained here has no known
pre-tokenizer hash (llama.cpp recognizes released vocabularies by hash), so it is told the name."""


def timed(cmd: list[str], repeat: int, env: dict | None = None) -> tuple[float, float]:
    """Best wall time and best CPU time of ``repeat`` runs of ``cmd`` (its output hidden unless it fails)."""
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


def llama_quantize(given: str | None) -> Path:
    """llama-quantize: the one given, else the one ``bench/llama_tools.sh`` builds (or finds cached)."""
    if given:
        return Path(given)
    out = subprocess.run(["bash", str(HERE / "llama_tools.sh")], check=True, capture_output=True, text=True)
    return Path(out.stdout.strip()) / "llama-quantize"


def model(args, work: Path) -> Path:
    """The Hugging Face folder to convert: ``--hf``, or the family's tiny model scaled up, built once."""
    if args.hf:
        return Path(args.hf)
    from tiny_models import family_model

    hf = work / "hf"
    if not (hf / "config.json").exists():
        over = {"num_hidden_layers": args.layers}
        if args.hidden:
            over.update(hidden_size=args.hidden, intermediate_size=2 * args.hidden, num_attention_heads=args.hidden // 64)
        family_model(args.family, hf, **over)
    return hf


def run(args) -> list[tuple[str, float, float, int | None]]:
    from matq_converters.exporters.gguf import converter

    work = Path(args.workdir or tempfile.mkdtemp(prefix="matq-bench-gguf-speed-"))
    work.mkdir(parents=True, exist_ok=True)
    hf, ck = model(args, work), work / "ck"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    matq = [sys.executable, "-c", "from matq_cli.main import main; main()"]
    rows = [("matq quantize --layers linear (once, for every width)",
             *timed([*matq, "quantize", str(hf), "-o", str(ck), "--layers", "linear", "--force"], 1, env), None)]
    mib = sum(f.stat().st_size for f in hf.glob("*.safetensors")) / 2**20
    print(f"model: {hf.name if args.hf else args.family}, {mib:.0f} MiB of safetensors; {os.cpu_count()} CPUs; "
          f"best of {args.repeat}", flush=True)
    convert = [*matq, "convert", str(ck), "--to", "gguf", "--force", "--bits", "4"]
    for label, extra, out in (("compact", [], "matq-q4.gguf"), ("--exact", ["--exact"], "matq-q4-exact.gguf")):
        rows.append((f"matq convert --to gguf --bits 4 ({label})",
                     *timed([*convert, *extra, "-o", str(work / out)], args.repeat, env), (work / out).stat().st_size))
    f16, q4 = work / "llama-f16.gguf", work / "llama-q4_k_m.gguf"
    conv = timed([sys.executable, "-c", CONVERT, str(converter.folder()), str(ROOT), str(hf), "--outtype", "f16",
                  "--outfile", str(f16)], args.repeat)
    quant = timed([str(llama_quantize(args.llama_quantize)), str(f16), str(q4), "Q4_K_M", str(args.threads)],
                  args.repeat)
    rows.append(("llama.cpp convert_hf_to_gguf.py --outtype f16", *conv, f16.stat().st_size))
    rows.append((f"llama.cpp llama-quantize Q4_K_M ({args.threads} threads)", *quant, q4.stat().st_size))
    rows.append(("llama.cpp convert + quantize", conv[0] + quant[0], conv[1] + quant[1], q4.stat().st_size))
    if not args.keep:
        shutil.rmtree(work, ignore_errors=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="Llama 3", help="A key of tests/tiny_models.FAMILIES.")
    ap.add_argument("--hidden", type=int, default=1024, help="Hidden size (FFN twice that); 0: the tiny one.")
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--hf", help="A Hugging Face folder to convert instead of a tiny model.")
    ap.add_argument("--repeat", type=int, default=2, help="Runs of each command; the best is kept.")
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1, help="llama-quantize threads.")
    ap.add_argument("--llama-quantize", help="Path of llama-quantize (default: bench/llama_tools.sh's).")
    ap.add_argument("--workdir", help="Reuse or keep the model and checkpoint here (default: a temporary folder).")
    ap.add_argument("--keep", action="store_true", help="Keep the work folder.")
    args = ap.parse_args()
    rows = run(args)
    print("| step | wall s | CPU s | MiB out |\n|---|---|---|---|")
    for label, wall, cpu, size in rows:
        print(f"| {label} | {wall:.2f} | {cpu:.2f} | {'-' if size is None else f'{size / 2**20:.1f}'} |")


if __name__ == "__main__":
    main()
