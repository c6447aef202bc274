"""GGUF files through llama.cpp (llama-cpp-python): loading with AMX repacking off, full logits per
window, and bits per weight the way llama.cpp counts them."""

from __future__ import annotations

import contextlib
import inspect
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .errors import CandidateError


@contextlib.contextmanager
def quiet_stderr():
    """File descriptor 2 silenced: llama.cpp logs every tensor it loads or quantizes there."""
    sys.stderr.flush()
    saved = os.dup(2)
    with open(os.devnull, "wb") as null:
        os.dup2(null.fileno(), 2)
        try:
            yield
        finally:
            os.dup2(saved, 2)
            os.close(saved)


def load_llama(path: str | os.PathLike, **kw):
    """``llama_cpp.Llama(path, **kw)`` with llama.cpp's extra CPU buffer types off (``use_extra_bufts``).

    The extra buffer types repack weights for faster matmuls, AMX among them: on CPUs with AMX
    (Sapphire Rapids and later) a llama.cpp built with AMX crashes in ``ggml_backend_amx_mul_mat``
    (ggml-org/llama.cpp#20824) or gives wrong Q4_0/Q4_1 results (#16315). llama-cpp-python 0.3.36's
    ``Llama`` has no ``use_extra_bufts`` keyword (and ignores keywords it does not know), so the
    model parameters it starts from are switched while it loads; the result is checked.
    """
    import llama_cpp
    import llama_cpp.llama_cpp as lib

    if "use_extra_bufts" in inspect.signature(llama_cpp.Llama.__init__).parameters:
        llm = llama_cpp.Llama(str(path), use_extra_bufts=False, **kw)
    else:
        default = lib.llama_model_default_params

        def params():
            p = default()
            p.use_extra_bufts = False
            return p

        lib.llama_model_default_params = params
        try:
            llm = llama_cpp.Llama(str(path), **kw)
        finally:
            lib.llama_model_default_params = default
    if llm.model_params.use_extra_bufts is not False:
        raise RuntimeError("llama.cpp's extra buffer types are still on")
    return llm


@dataclass(frozen=True)
class GGUFSize:
    """What a GGUF file's tensors hold, as llama.cpp reports it (``model size``, ``BPW``)."""

    bytes: int
    """Sum of the tensors' bytes (the file minus header and metadata)."""
    params: int
    linear_bytes: int
    """Of 2-D tensors inside the blocks (``blk.*``): attention and FFN matrices."""
    linear_params: int
    matq: bool
    """Written by matq (``matq.converter`` key) with quantized slices in it. llama.cpp's quantizer copies
    every key of its input, so its files from a float GGUF that matq wrote carry ``matq.*`` keys
    too, with ``matq.quantized_tensors`` 0."""

    @property
    def bits_per_weight(self) -> float:
        return self.bytes * 8 / self.params

    @property
    def linear_bits_per_weight(self) -> float:
        return self.linear_bytes * 8 / self.linear_params if self.linear_params else float("nan")


def gguf_size(path: str | os.PathLike) -> GGUFSize:
    """Bytes and element counts of a GGUF file's tensors (gguf.GGUFReader)."""
    import gguf

    r = gguf.GGUFReader(path)
    nbytes = params = lin_bytes = lin_params = 0
    for t in r.tensors:
        n = int(t.n_elements)
        nbytes += int(t.n_bytes)
        params += n
        if t.name.startswith("blk.") and len([d for d in t.shape if d > 1]) == 2:
            lin_bytes += int(t.n_bytes)
            lin_params += n
    q = r.get_field("matq.quantized_tensors")
    matq = r.get_field("matq.converter") is not None and q is not None and int(q.parts[q.data[0]][0]) > 0
    return GGUFSize(nbytes, params, lin_bytes, lin_params, matq)


class LlamaRunner:
    """Logits of one window at a time from a GGUF file; the window's tokens are given as ids."""

    def __init__(self, path: str | os.PathLike, ctx: int, vocab: int, threads: int | None = None):
        self.path = Path(path)
        threads = threads or os.cpu_count() or 1
        self.llm = load_llama(
            self.path,
            n_ctx=ctx,
            n_batch=ctx,
            n_ubatch=ctx,
            n_threads=threads,
            n_threads_batch=threads,
            logits_all=True,
            verbose=False,
        )
        if self.llm.n_vocab() != vocab:
            raise CandidateError(
                self.path, f"has a vocabulary of {self.llm.n_vocab()} tokens, the reference {vocab}"
            )

    def logits(self, tokens: np.ndarray, first: int) -> np.ndarray:
        """float32 logits ``[ctx - 1 - first, vocab]`` predicting ``tokens[first + 1:]``."""
        self.llm.reset()
        self.llm.eval([int(t) for t in tokens])
        return np.array(self.llm.scores[first : len(tokens) - 1], dtype=np.float32)

    def close(self) -> None:
        self.llm.close()
