"""Tensor-level post-training quantization: one 2-D weight into codes (or bit-planes), scale and
zero, in row blocks on a thread pool, with writes running behind on their own thread.

Every formula comes from ``matq_format.numerics`` and ``matq_format.multiwidth`` through
:class:`~matq_format.quantspec.QuantizeSpec`; the data-free and the calibrated orchestrators
(``quantize``, ``calibrated``) both build on this module.
"""

from __future__ import annotations

import math
import os
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait

import numpy as np

import matq_format as mf
from matq_converters.importers.hf.source import HFSource, SourceError
from matq_format import numerics
from matq_format import planes as mf_planes
from matq_format.quantspec import QuantizeSpec

__all__ = [
    "NonFiniteWeightError",
    "WriteBehind",
    "checkpoint_writer",
    "copy_dense",
    "quantize_stack",
    "quantize_stack_planes",
    "quantize_tensor",
    "quantize_tensor_planes",
]

CHUNK_ELEMENTS = 1 << 19
"""Weights per work item: a block's bfloat16 weights (1 MiB) and codes stay in cache, and there are
enough items to share; fewer, larger items spend less time in Python per weight."""


class NonFiniteWeightError(SourceError):
    """A selected weight holds NaN or infinity, or a range no float16 scale can cover."""


_scratch = threading.local()


def worker_threads(threads: int | None) -> int:
    """Quantize workers: ``threads`` if given, else the CPUs, at most 8 (``--threads``'s default)."""
    return max(1, threads or min(8, os.cpu_count() or 1))


def _scratch_f32(n: int) -> np.ndarray:
    """This thread's float32 work buffer: reused, so blocks do not fault in fresh pages every time."""
    buf = getattr(_scratch, "f32", None)
    if buf is None or buf.size < n:
        buf = _scratch.f32 = np.empty(n, np.float32)
    return buf[:n]


def _to_float32(block: np.ndarray, out: np.ndarray) -> np.ndarray:
    """Stored weights widened into a float32 buffer; BF16 by a 16-bit shift (exact, faster than astype)."""
    if block.dtype.itemsize == 2 and block.dtype != np.float16:  # bfloat16
        np.left_shift(block.view(np.uint16), 16, out=out.view(np.uint32), dtype=np.uint32)
    else:
        np.copyto(out, block, casting="same_kind")
    return out


def _scratch_u8(n: int) -> np.ndarray:
    """This thread's buffer for one block's codes, packed from cache into the planes right after."""
    buf = getattr(_scratch, "u8", None)
    if buf is None or buf.size < n:
        buf = _scratch.u8 = np.empty(n, np.uint8)
    return buf[:n]


def quantize_tensor(
    w: np.ndarray,
    spec: QuantizeSpec,
    *,
    name: str = "",
    path: str | os.PathLike | None = None,
    pool: ThreadPoolExecutor | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Codes ``[rows, cols]`` uint8, scale and zero ``[rows, groups]`` float32 of one 2-D weight.

    Works in blocks of whole rows, so the result is the same as one call of the numerics functions
    on the whole tensor. When the group size divides the row, groups are laid out as rows of their
    own (the same arithmetic, and broadcasting instead of repeating the parameters).
    """
    return _quantize_blocks(w, spec, None, name=name, path=path, pool=pool)


def quantize_tensor_planes(
    w: np.ndarray,
    spec: QuantizeSpec,
    planes: np.ndarray,
    *,
    name: str = "",
    path: str | os.PathLike | None = None,
    pool: ThreadPoolExecutor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`quantize_tensor` with the codes packed straight into bit-planes; returns scale, zero.

    ``planes`` is ``uint8 [code_bits, plane_stride(rows * cols)]`` (reusable from tensor to tensor:
    no fresh pages to fault in). Each row block is packed by the thread that quantized it, while its
    codes are still in cache; the planes equal ``planes.pack(quantize_tensor(...)[0], code_bits)``.
    """
    return _quantize_blocks(w, spec, planes, name=name, path=path, pool=pool)[1:]


def quantize_stack(
    w: np.ndarray,
    spec: QuantizeSpec,
    input_axis: int,
    *,
    name: str = "",
    path: str | os.PathLike | None = None,
    pool: ThreadPoolExecutor | None = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """:func:`quantize_tensor` of a weight of any layout (spec 10.5): a stack of matrices with input
    features on ``input_axis``, quantized as its matrix view. Codes come back in ``w``'s shape, scale
    and zero in ``numerics.param_shape``."""
    codes, scale, zero = quantize_tensor(numerics.as_matrix(w, input_axis), spec, name=name, path=path, pool=pool)
    pshape = numerics.param_shape(w.shape, spec.group_size, input_axis)
    return (
        numerics.from_matrix(codes, w.shape, input_axis),
        numerics.from_matrix(scale, pshape, input_axis),
        numerics.from_matrix(zero, pshape, input_axis),
    )


def quantize_stack_planes(
    w: np.ndarray,
    spec: QuantizeSpec,
    planes: np.ndarray,
    input_axis: int,
    *,
    name: str = "",
    path: str | os.PathLike | None = None,
    pool: ThreadPoolExecutor | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`quantize_stack` packed into ``planes``; returns scale, zero. With the input axis last
    the matrix view is a view, so blocks pack in place as :func:`quantize_tensor_planes` packs them."""
    if input_axis % w.ndim != w.ndim - 1:
        codes, scale, zero = quantize_stack(w, spec, input_axis, name=name, path=path, pool=pool)
        mf_planes.pack_into(codes, spec.code_bits, planes, 0)
        return scale, zero
    scale, zero = quantize_tensor_planes(
        numerics.as_matrix(w, input_axis), spec, planes, name=name, path=path, pool=pool
    )
    pshape = numerics.param_shape(w.shape, spec.group_size, input_axis)
    return scale.reshape(pshape), zero.reshape(pshape)


def _quantize_blocks(
    w: np.ndarray,
    spec: QuantizeSpec,
    planes: np.ndarray | None,
    *,
    name: str,
    path: str | os.PathLike | None,
    pool: ThreadPoolExecutor | None,
) -> tuple[np.ndarray | None, np.ndarray, np.ndarray]:
    rows, cols = w.shape
    gs = spec.group_size
    groups = numerics.n_groups(cols, gs)
    flat = gs is not None and cols % gs == 0
    codes = np.empty((rows, cols), np.uint8) if planes is None else None
    scale = np.empty((rows, groups), np.float32)
    zero = np.empty((rows, groups), np.float32)
    step = max(1, CHUNK_ELEMENTS // cols)
    if planes is not None:  # blocks of whole 64-code words, so no two threads write the same word
        unit = 64 // math.gcd(cols, 64)
        step = -(-step // unit) * unit

    def _check_finite(f: np.ndarray, r0: int, r1: int) -> None:
        with np.errstate(over="ignore", invalid="ignore"):  # a NaN or inf makes the sum non-finite
            finite = np.isfinite(np.add.reduce(f, axis=None)) or np.isfinite(f).all()
        if not finite:
            raise NonFiniteWeightError(path, f"{name}: rows {r0}..{r1 - 1} hold NaN or infinity")

    def work(r0: int) -> None:
        r1 = min(rows, r0 + step)
        block = w[r0:r1]
        scratch = _scratch_f32((r1 - r0) * cols).reshape(r1 - r0, cols)
        direct = (
            spec.objective == "minmax"
            and not spec.signed_scales  # the sign flip needs a float32 copy to write into
            and numerics.reads_bf16_as_stored(block, spec.code_bits)
        )
        f = block if direct else _to_float32(block, scratch)
        if (
            spec.objective != "minmax"
        ):  # MinMax needs no pass of its own: a NaN or inf makes its scale non-finite
            _check_finite(f, r0, r1)
        q = codes[r0:r1] if codes is not None else _scratch_u8((r1 - r0) * cols).reshape(r1 - r0, cols)
        try:
            if flat:
                a, z = spec.params_and_codes(f.reshape(-1, gs), None, q.reshape(-1, gs), cols)
            else:
                a, z = spec.params_and_codes(f, gs, q)
        except OverflowError:
            a = z = np.array([np.inf])
        if not (np.all(np.isfinite(a)) and np.all(np.isfinite(z))):
            _check_finite(_to_float32(block, scratch), r0, r1)  # the scratch was overwritten: widen again
            raise NonFiniteWeightError(
                path, f"{name}: rows {r0}..{r1 - 1} span a range no {spec.scale_dtype} scale covers"
            )
        scale[r0:r1] = a.reshape(r1 - r0, groups)
        zero[r0:r1] = z.reshape(r1 - r0, groups)
        if planes is not None:
            mf_planes.pack_into(q, spec.code_bits, planes, r0 * cols)

    starts = range(0, rows, step)
    if pool is None or len(starts) == 1:
        for r0 in starts:
            work(r0)
    else:
        for _ in pool.map(work, starts):
            pass
    return codes, scale, zero


class WriteBehind:
    """Runs writer calls in order on one thread while the caller quantizes what comes next.

    The queue is not bounded: a queued dense tensor holds no memory (its job maps it), and a
    quantized one holds planes in one of the caller's buffers, which the caller takes back with
    :meth:`wait`. So the writer thread, which copies every byte into the output files, rarely waits
    for the quantizer, and the quantizer waits only for a buffer. A failure in either thread stops
    both (the writer then aborts).
    """

    def __init__(self, progress: Callable[[int], None] | None):
        self._io = ThreadPoolExecutor(1, thread_name_prefix="matq-write")
        self._pending: deque[tuple[Future, int]] = deque()
        self._queued = 0  # jobs put so far; the one at the front of _pending is number _done
        self._done = 0
        self._failed = False
        self._progress = progress

    def _pop(self) -> None:
        fut, nbytes = self._pending[0]
        fut.result()
        self._pending.popleft()
        self._done += 1
        if self._progress is not None:
            self._progress(nbytes)

    def _run(self, job: Callable[[], None]) -> None:
        if self._failed:  # an earlier job failed: write nothing more
            return
        try:
            job()
        except BaseException:
            self._failed = True
            raise

    def put(self, job: Callable[[], None], nbytes: int) -> int:
        """Queue ``job`` after the ones before it (and report the jobs that have run); returns its
        ticket for :meth:`wait`."""
        while self._pending and self._pending[0][0].done():
            self._pop()
        self._pending.append((self._io.submit(self._run, job), nbytes))
        self._queued += 1
        return self._queued - 1

    def wait(self, ticket: int | None) -> None:
        """Wait until job ``ticket`` (and so every job before it) has run: a counter, not a search
        of the queue, so a model of many tensors costs linear time."""
        while ticket is not None and self._done <= ticket:
            self._pop()

    def __enter__(self) -> WriteBehind:
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        try:
            if exc_type is None:
                while self._pending:
                    self._pop()
            else:
                self._failed = True
                futures_wait([f for f, _ in self._pending])  # let it stop touching the files first
        finally:
            self._io.shutdown(wait=True)


def copy_dense(writer: mf.CheckpointWriter, src: HFSource, name: str) -> None:
    """Store a tensor as it came, copied file to file by the kernel: a queued one holds no memory."""
    t = src.tensors[name]
    writer.add_dense_from_file(name, *src.location(name), t.dtype, t.shape)


def checkpoint_writer(
    src: HFSource, out: str | os.PathLike, spec: QuantizeSpec, source: dict, overwrite: bool
) -> mf.CheckpointWriter:
    """The writer of ``src``'s checkpoint, as both orchestrators open it: non-weight files carried
    from the model folder, every tensor expected, reads confined to its roots."""
    return mf.CheckpointWriter(
        out,
        spec.code_bits,
        carry_from=src.root,
        source=source,
        overwrite=overwrite,
        expected_tensors=len(src.tensors),
        inputs=src.roots,
        **spec.writer_options(),
    )
