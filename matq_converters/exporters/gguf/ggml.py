"""ggml's own quantizer (``ggml_quantize_chunk``), from the libggml that llama-cpp-python installs.

gguf-py quantizes the 32-weight types in numpy, bit for bit as ggml's reference code does (its tests
check it against this same function), but some fifty times slower: for a 168M-weight embedding that
is most of an export's time. Where llama-cpp-python is installed (``matq[llama]``), a float tensor
is quantized by ggml itself, rows split across threads; elsewhere by gguf-py. The bytes are the
same either way (tests/test_gguf_blocks.py checks both against each other).
"""

from __future__ import annotations

import ctypes
import functools
import importlib.util
import os
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np

CHUNK = 1 << 20
"""Weights per call: small enough to share among threads, large enough to cost no Python time."""


@functools.cache
def _library() -> ctypes.CDLL | None:
    """llama-cpp-python's libggml-base, found without importing llama_cpp (which loads libllama);
    None where it is not installed or has no such library."""
    spec = importlib.util.find_spec("llama_cpp")
    if spec is None or spec.origin is None:
        return None
    found = sorted((Path(spec.origin).parent / "lib").glob("libggml-base.*"))
    try:
        lib = ctypes.CDLL(str(found[0]))
        fn = lib.ggml_quantize_chunk
    except (IndexError, OSError, AttributeError):
        return None
    fn.restype = ctypes.c_size_t
    fn.argtypes = (ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                   ctypes.c_void_p)
    return lib


def available() -> bool:
    """Whether ggml's quantizer can be called here."""
    return _library() is not None


def quantize(w: np.ndarray, qtype) -> np.ndarray:
    """``w`` (float32 ``[rows, cols]``) as ``qtype``'s blocks, ``[rows, bytes per row]``, by ggml;
    for the types ggml quantizes without an importance matrix."""
    import gguf

    lib = _library()
    if lib is None:
        raise RuntimeError("llama-cpp-python's libggml is not installed")
    w = np.ascontiguousarray(w, np.float32)
    rows, cols = w.shape
    out = np.empty(gguf.quant_shape_to_byte_shape((rows, cols), qtype), np.uint8)
    step = max(1, CHUNK // max(cols, 1))

    def chunk(start: int) -> None:
        n = min(step, rows - start)
        lib.ggml_quantize_chunk(int(qtype), w[start].ctypes.data, out[start].ctypes.data, 0, n, cols, None)

    starts = range(0, rows, step)
    if len(starts) > 1:
        with ThreadPoolExecutor(min(len(starts), os.cpu_count() or 1)) as pool:
            list(pool.map(chunk, starts))
    elif rows:
        chunk(0)
    return out
