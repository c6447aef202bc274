"""``evaluate``: one reference, many candidates, one pass of the reference.

The reference (a Hugging Face folder, float32 in transformers) runs once; its logits at the scored
positions are cached in a temporary file as float32 (exact: a model compared with itself scores
KLD 0), one window at a time, and read back one window at a time for every candidate. Peak memory
is one model plus a few windows of logits (``ctx x vocab`` floats, 100 MB at 512 x 49k); the cache
takes ``windows x (ctx - 1 - first) x vocab x 4`` bytes of disk (3.2 GB for 32k tokens at 512 / 49k
vocab), in ``cache_dir`` (default: the system's temporary folder), removed at the end.

Candidates (strings, parsed by :func:`parse_candidate`):
  ``model.gguf``              a GGUF file, run by llama.cpp (llama-cpp-python)
  ``ckpt@4`` ``ckpt@8,4,2``   a matq checkpoint at one or more widths, in transformers
  ``ckpt@2+ep``               ... served with the extra bucket
  ``ckpt@plan:pyramid``       ... at a Mix'n'Match plan (any ``matq slice --plan`` spec)
  ``hf-folder``               another Hugging Face folder, as it is
  ``onnx-folder``             a folder with ``model.onnx`` (a decoder with a past cache), run by onnxruntime
"""

from __future__ import annotations

import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

import matq_format as mf
from matq_converters.exporters.gguf.export import is_gguf
from matq_format import constants as C

from . import hf as H
from . import llama as L
from . import onnx as O
from .errors import CacheSpaceError, CandidateError
from .metrics import Sums, score
from .text import DEFAULT_CTX, DEFAULT_MAX_TOKENS, Windows, load_windows

KINDS = ("reference", "hf", "matq", "matq-plan", "gguf", "gguf-matq", "onnx", "onnx-matq")
"""What a result is: the reference itself, another HF folder, a matq width or plan in transformers,
a GGUF file from llama.cpp's tools (or any other writer), a GGUF file written by matq, and the same
two for ONNX folders."""

_AT = re.compile(r"^(?:(?P<widths>\d+(?:,\d+)*)|plan:(?P<plan>.+?))(?P<ep>\+ep)?$")

Progress = Callable[[str, int, int], None]
"""``progress(name, windows_done, windows_total)``: called before the first window and after each."""


@dataclass(frozen=True)
class Candidate:
    name: str
    kind: str
    path: Path
    bits: int | None = None
    plan: str | None = None
    extra_precision: bool = False


@dataclass
class Result:
    name: str
    kind: str
    path: str
    bits_per_weight: float
    """Every tensor's bits over every tensor's elements, as llama.cpp reports a file's BPW."""
    linear_bits_per_weight: float
    """The same over the 2-D tensors inside transformer blocks (attention and FFN matrices)."""
    bytes: int
    params: int
    ppl: float
    kld: float
    """Mean KL divergence from the reference to this model per scored token, nats."""
    top1: float
    """Share of scored tokens where this model's most likely token is the reference's."""
    tokens: int
    """Scored tokens."""
    load_seconds: float
    seconds: float
    """Time to run every window (loading excluded)."""

    def to_dict(self) -> dict:
        return asdict(self)


def _base_name(path: Path) -> str:
    return path.name if path.name != C.BASE_FILENAME else path.parent.name


def _is_checkpoint(path: Path) -> bool:
    return (path / C.BASE_FILENAME).is_file() if path.is_dir() else path.suffix == ".safetensors"


def parse_candidate(spec: str | os.PathLike) -> list[Candidate]:
    """One spec string -> its candidates (``ckpt@8,4`` gives two); see the module doc."""
    text = os.fspath(spec)
    path, at, suffix = text.rpartition("@")
    m = _AT.match(suffix) if at else None
    if m is None:
        path = text
    p = Path(path)
    if not p.exists():
        raise CandidateError(p, "no such file or folder")
    if m is None:
        if p.is_file() and is_gguf(p):
            return [Candidate(p.name, "gguf", p)]
        if _is_checkpoint(p):
            raise CandidateError(
                p,
                "is a matq checkpoint: give a width or plan, e.g. CKPT@4, CKPT@8,4,2, CKPT@2+ep, CKPT@plan:pyramid",
            )
        if O.is_onnx_folder(p):
            return [Candidate(p.name, "onnx", p)]
        if p.is_dir() and (p / "config.json").is_file():
            return [Candidate(p.name, "hf", p)]
        raise CandidateError(
            p, "is neither a GGUF file, a matq checkpoint, an ONNX folder nor a Hugging Face model folder"
        )
    if not _is_checkpoint(p):
        raise CandidateError(p, f"@{suffix} needs a matq checkpoint, and this is not one")
    ep = bool(m.group("ep"))
    tag = "+ep" if ep else ""
    base = _base_name(p)
    if m.group("plan"):
        plan = m.group("plan")
        return [Candidate(f"{base}@plan:{plan}{tag}", "matq-plan", p, plan=plan, extra_precision=ep)]
    return [
        Candidate(f"{base}@{r}{tag}", "matq", p, bits=int(r), extra_precision=ep)
        for r in m.group("widths").split(",")
    ]


@dataclass
class _Prepared:
    cand: Candidate
    size: object
    widths: dict[str, int] | None = None


def _prepare(c: Candidate) -> _Prepared:
    """Everything that can fail cheaply, checked before the reference runs."""
    if c.kind == "gguf":
        size = L.gguf_size(c.path)
        if size.matq:
            c = Candidate(c.name, "gguf-matq", c.path)
        return _Prepared(c, size)
    if c.kind == "onnx":
        O.check_runnable(c.path)
        size = O.onnx_size(c.path)
        return _Prepared(Candidate(c.name, "onnx-matq", c.path) if size.matq else c, size)
    if c.kind == "hf":
        return _Prepared(c, H.hf_size(c.path))
    ckpt = mf.open(c.path)
    widths = mf.resolve_plan(
        c.plan if c.plan is not None else c.bits, ckpt, extra_precision=c.extra_precision
    )
    if c.extra_precision and any(r >= ckpt.code_bits for r in widths.values()):
        raise CandidateError(c.path, f"{c.name}: extra precision needs widths below {ckpt.code_bits}")
    return _Prepared(c, H.matq_size(ckpt, widths, c.extra_precision), widths)


def _open(p: _Prepared, windows: Windows, vocab: int, threads: int | None):
    c = p.cand
    if c.kind in ("gguf", "gguf-matq"):
        return L.LlamaRunner(c.path, windows.ctx, vocab, threads)
    if c.kind in ("onnx", "onnx-matq"):
        return O.OrtRunner(c.path, vocab, threads)
    if c.kind == "hf":
        return H.TorchRunner(H.load_hf(c.path), vocab, c.path, threads)
    ckpt = mf.open(c.path)
    return H.TorchRunner(H.load_matq(ckpt, p.widths, c.extra_precision), vocab, c.path, threads)


class _Cache:
    """Reference logits of the scored positions, one float32 block per window, in a temporary file."""

    def __init__(self, rows: int, vocab: int, n: int, folder: str | os.PathLike | None):
        self.shape = (rows, vocab)
        self.block = rows * vocab * 4
        folder = folder or tempfile.gettempdir()
        free = shutil.disk_usage(folder).free
        if self.block * n > free:
            raise CacheSpaceError(
                folder,
                f"the reference logits need {self.block * n / 2**30:.1f} GiB here, {free / 2**30:.1f} GiB is free "
                "(lower --max-tokens or pick another cache folder)",
            )
        self.f = tempfile.TemporaryFile(prefix="matq-eval-", dir=folder)

    def write(self, a: np.ndarray) -> None:
        np.ascontiguousarray(a, dtype=np.float32).tofile(self.f)

    def read(self, i: int) -> np.ndarray:
        self.f.seek(i * self.block)
        return np.fromfile(self.f, np.float32, self.block // 4).reshape(self.shape)

    def close(self) -> None:
        self.f.close()


def _result(c: Candidate, size, sums: Sums, load_s: float, run_s: float) -> Result:
    return Result(
        c.name,
        c.kind,
        str(c.path),
        size.bits_per_weight,
        size.linear_bits_per_weight,
        int(size.bytes),
        int(size.params),
        sums.ppl,
        sums.mean_kld,
        sums.top1_rate,
        sums.n,
        round(load_s, 3),
        round(run_s, 3),
    )


def evaluate(
    reference: str | os.PathLike,
    candidates: Sequence[str | os.PathLike | Candidate],
    text: str | os.PathLike | Iterable[str | os.PathLike],
    *,
    ctx: int = DEFAULT_CTX,
    max_tokens: int = DEFAULT_MAX_TOKENS,
    first: int | None = None,
    threads: int | None = None,
    cache_dir: str | os.PathLike | None = None,
    progress: Progress | None = None,
) -> list[Result]:
    """Perplexity, KLD and top-1 agreement of every candidate against ``reference`` on ``text``.

    Returns the reference's own result first, then one per candidate in order. ``first``: the
    first scored position of each window (default ``ctx // 2``, as llama.cpp's perplexity tool).
    """
    reference = Path(reference)
    cands = [c for s in candidates for c in ([s] if isinstance(s, Candidate) else parse_candidate(s))]
    prepared = [_prepare(c) for c in cands]
    ref_size = H.hf_size(reference)
    windows = load_windows(reference, text, ctx, max_tokens, first)
    n = len(windows.tokens)
    tick = progress or (lambda name, done, total: None)

    ref_name = f"{reference.name} (reference)"
    t0 = time.perf_counter()
    runner = H.TorchRunner(H.load_hf(reference), None, reference, threads)
    vocab = runner.vocab
    load_s = time.perf_counter() - t0
    cache = _Cache(windows.scored_per_window, vocab, n, cache_dir) if prepared else None
    try:
        t0 = time.perf_counter()
        sums = Sums()
        tick(ref_name, 0, n)
        for i in range(n):
            logits = runner.logits(windows.tokens[i], windows.first)
            sums += score(logits, windows.targets(i))
            if cache is not None:
                cache.write(logits)
            tick(ref_name, i + 1, n)
        runner.close()
        del runner
        ref = Candidate(ref_name, "reference", reference)
        results = [_result(ref, ref_size, sums, load_s, time.perf_counter() - t0)]
        for p in prepared:
            t0 = time.perf_counter()
            runner = _open(p, windows, vocab, threads)
            load_s = time.perf_counter() - t0
            t0 = time.perf_counter()
            sums = Sums()
            tick(p.cand.name, 0, n)
            for i in range(n):
                test = runner.logits(windows.tokens[i], windows.first)
                sums += score(test, windows.targets(i), cache.read(i))
                tick(p.cand.name, i + 1, n)
            runner.close()
            del runner
            results.append(_result(p.cand, p.size, sums, load_s, time.perf_counter() - t0))
    finally:
        if cache is not None:
            cache.close()
    return results
