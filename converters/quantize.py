"""Post-training quantization of a Hugging Face model folder into a matq checkpoint, without data.

    from matq_converters.quantize import quantize_hf
    quantize_hf("Llama-3.2-1B", "Llama-3.2-1B-matq")                       # FFN, group 128, MinMax
    quantize_hf("Llama-3.2-1B", "out", layers="linear", objective="multiwidth", group_size=None)

Selected tensors stream from memory-mapped shards one at a time; each is cut into row blocks that
fit in cache, quantized and packed into bit-planes on a few threads, while a writer thread stores
the tensor before (peak memory is about twice the largest selected tensor's BF16 bytes: its map
and two plane buffers). Every formula comes from ``matq_format.numerics``: ``minmax_params`` and
``quantize`` for MinMax, ``multiwidth_params`` and ``multiwidth_codes`` for the multi-width
objective. Unselected tensors are copied exactly as stored, file to file by the kernel. The output
appears only when complete; the input is only read.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import os
import threading
import warnings
from collections import deque
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import wait as futures_wait
from dataclasses import dataclass
from pathlib import Path

import numpy as np

import matq_format as mf
from matq_format import constants as C
from matq_format import multiwidth, numerics
from matq_format import planes as mf_planes
from matq_format.errors import MatqError, printable

from . import architectures
from .hf_source import HFSource, SourceError
from .registry import option

__all__ = [
    "DEFAULT_GROUP_SIZE",
    "GGUF_GROUP_SIZE",
    "BY_LAYOUT",
    "OBJECTIVES",
    "NonFiniteWeightError",
    "OptionError",
    "QuantizeSpec",
    "HFImportOptions",
    "HFImporter",
    "UnquantizedWarning",
    "quantize_hf",
    "quantize_tensor",
    "quantize_tensor_planes",
]

DEFAULT_GROUP_SIZE = 128
GGUF_GROUP_SIZE = 32
"""The gguf layout's group: llama.cpp's 32-weight blocks (Q4_0, Q5_0, Q8_0)."""
BY_LAYOUT = "by-layout"
"""``group_size`` default: :data:`GGUF_GROUP_SIZE` in the gguf layout, else :data:`DEFAULT_GROUP_SIZE`."""
"""Groups of 128 input columns, as MatGPTQ and the OmniQuant ports use; ``None`` is per channel."""
OBJECTIVES = ("minmax", "multiwidth")
SLICE_EXACT = "slice-exact"
CHUNK_ELEMENTS = 1 << 19
"""Weights per work item: a block's bfloat16 weights (1 MiB) and codes stay in cache, and there are
enough items to share; fewer, larger items spend less time in Python per weight."""


LAYOUTS = ("free", "gguf")


class OptionError(MatqError):
    """A quantization option that is out of range or inconsistent."""


class NonFiniteWeightError(SourceError):
    """A selected weight holds NaN or infinity, or a range no float16 scale can cover."""


class UnquantizedWarning(UserWarning):
    """Tensors the layer selection names that are stored dense: not 2-D float weights.

    ``tensors`` maps each name to why (``"1-D"``, ``"3-D"``, ``"dtype I32"``, ``"empty"``)."""

    SHOWN = 5

    def __init__(self, tensors: dict[str, str]):
        self.tensors = dict(tensors)
        super().__init__(self.tensors)  # args: rebuilt from them when pickled

    def __str__(self) -> str:
        listed = ", ".join(f"{printable(n)} ({why})" for n, why in list(self.tensors.items())[: self.SHOWN])
        n, more = len(self.tensors), len(self.tensors) - self.SHOWN
        return f"stored {n} tensor{'s' if n != 1 else ''} unquantized: {listed}" + (
            f", and {more} more" if more > 0 else ""
        )


@dataclass(frozen=True)
class QuantizeSpec:
    """How to quantize one tensor; validated once, used for every tensor."""

    code_bits: int = C.DEFAULT_CODE_BITS
    group_size: int | None = DEFAULT_GROUP_SIZE
    scheme: str = "asymmetric"
    zero_multiple: int = 1
    objective: str = "minmax"
    widths: tuple[int, ...] = multiwidth.MULTIWIDTH_WIDTHS
    lambdas: tuple[float, ...] = multiwidth.MULTIWIDTH_LAMBDAS
    extra_precision: tuple[int, ...] = ()
    scale_dtype: str = "F16"
    layout: str = "gguf"
    """``gguf``: symmetric, scales nested in 256-column super-blocks (``numerics.nest_scales``), so
    every width exports exactly to llama.cpp's compact types; ``free``: no constraint."""

    @classmethod
    def build(
        cls,
        *,
        code_bits: int = C.DEFAULT_CODE_BITS,
        group_size: int | None | str = BY_LAYOUT,
        scheme: str | None = None,
        zero_multiple: int | str = 1,
        objective: str | None = None,
        widths: Sequence[int] | None = None,
        lambdas: Sequence[float] | None = None,
        extra_precision: Sequence[int] = (),
        scale_dtype: str = "F16",
        layout: str = "gguf",
        calibrated: bool = False,
    ) -> QuantizeSpec:
        """Check every option and resolve ``zero_multiple="slice-exact"`` and the layout's defaults
        (``scheme`` None and ``group_size`` :data:`BY_LAYOUT`) and of calibration (``objective``,
        ``widths`` and ``lambdas`` None); raises :class:`OptionError`."""
        if objective is None:  # calibrated: GPTQ's codes with scales searched for the same objective
            objective = "multiwidth" if calibrated else "minmax"
        if group_size == BY_LAYOUT:
            group_size = GGUF_GROUP_SIZE if layout == "gguf" else DEFAULT_GROUP_SIZE
        if scheme is None:
            scheme = "symmetric" if layout == "gguf" else "asymmetric"
        if not C.MIN_CODE_BITS <= code_bits <= C.MAX_CODE_BITS_IMPL:
            raise OptionError(
                None, f"code bits {code_bits} outside {C.MIN_CODE_BITS}..{C.MAX_CODE_BITS_IMPL}"
            )
        if group_size is not None and (
            not isinstance(group_size, (int, np.integer)) or isinstance(group_size, bool) or group_size < 1
        ):
            raise OptionError(None, f"group size {group_size!r} must be a positive number of columns")
        if group_size is not None and group_size > C.MAX_DIM_SIZE:
            raise OptionError(
                None, f"group size {group_size} exceeds the format's limit of {C.MAX_DIM_SIZE} columns"
            )
        group_size = None if group_size is None else int(group_size)
        if layout not in LAYOUTS:
            raise OptionError(None, f"unknown layout {layout!r}; known: {', '.join(LAYOUTS)}")
        if layout == "gguf" and (scheme != "symmetric" or scale_dtype != "F16" or code_bits != 8):
            raise OptionError(None, "the gguf layout is symmetric with F16 scales and 8-bit codes")
        if scheme not in ("asymmetric", "symmetric"):
            raise OptionError(None, f"unknown scheme {scheme!r}; use asymmetric or symmetric")
        if objective not in OBJECTIVES:
            raise OptionError(None, f"unknown objective {objective!r}; known: {', '.join(OBJECTIVES)}")
        if scale_dtype not in C.SCALE_DTYPES:
            raise OptionError(None, f"scale dtype {scale_dtype!r} not one of {', '.join(C.SCALE_DTYPES)}")
        if widths is None:  # 8, 4, 2 (8, 5, 4, 3 calibrated) with c in place of 8
            base = multiwidth.CALIBRATED_WIDTHS if calibrated else multiwidth.MULTIWIDTH_WIDTHS
            widths = sorted({min(r, code_bits) for r in base} | {code_bits}, reverse=True)
        widths = tuple(int(r) for r in widths)
        if not widths or any(not 1 <= r <= code_bits for r in widths):
            raise OptionError(None, f"widths {list(widths)} must be non-empty and within 1..{code_bits}")
        if lambdas is None:
            lambdas = multiwidth.noise_equal_lambdas(widths) if calibrated else [1.0] * len(widths)
        lambdas = tuple(float(v) for v in lambdas)
        if (
            len(lambdas) != len(widths)
            or any(not np.isfinite(v) or v < 0 for v in lambdas)
            or sum(lambdas) <= 0
        ):
            raise OptionError(None, "lambdas must be one non-negative number per width, not all zero")
        extra_precision = tuple(sorted({int(r) for r in extra_precision}))
        if any(not 1 <= r < code_bits for r in extra_precision):
            raise OptionError(None, f"extra-precision widths must lie in 1..{code_bits - 1}")
        if zero_multiple == SLICE_EXACT:
            zero_multiple = 1 << (code_bits - min(widths))
        try:
            zero_multiple = int(zero_multiple)
        except (TypeError, ValueError):
            raise OptionError(None, f"zero multiple must be an integer or {SLICE_EXACT!r}") from None
        if zero_multiple < 1 or zero_multiple & (zero_multiple - 1) or zero_multiple > 1 << (code_bits - 1):
            raise OptionError(
                None, f"zero multiple {zero_multiple} must be a power of two up to {1 << (code_bits - 1)}"
            )
        return cls(
            code_bits,
            group_size,
            scheme,
            zero_multiple,
            objective,
            widths,
            lambdas,
            extra_precision,
            scale_dtype,
            layout,
        )

    def params_and_codes(
        self, w: np.ndarray, group_size: int | None, out: np.ndarray, cols: int | None = None
    ) -> tuple[np.ndarray, np.ndarray]:
        """Scale and zero of a float32 block, its codes into ``out``; the formulas all live in numerics.

        ``w`` is overwritten (it is the caller's scratch buffer). ``cols``: the tensor's row length
        when ``w`` holds its groups as rows (``group_size=None`` then), for the gguf layout.
        """
        sym = self.scheme == "symmetric"
        sign = self.flip_signs(w, group_size)
        a, z = self._params_and_codes(w, group_size, out, cols, sym)
        return (a, z) if sign is None else (a * sign, z)

    def _params_and_codes(
        self, w: np.ndarray, group_size: int | None, out: np.ndarray, cols: int | None, sym: bool
    ) -> tuple[np.ndarray, np.ndarray]:
        if self.objective == "minmax":
            a, z = numerics.minmax_params(
                w,
                self.code_bits,
                group_size,
                symmetric=sym,
                zero_multiple=self.zero_multiple,
                scale_dtype=self.scale_dtype,
            )
            a = self._nest(a, w.shape[1], group_size, cols)
            numerics.quantize(w, a, z, self.code_bits, group_size, out=out, work=w)
            return a, z
        mw = dict(widths=self.widths, lambdas=self.lambdas, extra_precision=self.extra_precision)
        a, z = multiwidth.multiwidth_params(
            w,
            self.code_bits,
            group_size,
            symmetric=sym,
            zero_multiple=self.zero_multiple,
            scale_dtype=self.scale_dtype,
            **mw,
        )
        a = self._nest(a, w.shape[1], group_size, cols)
        out[...] = multiwidth.multiwidth_codes(w, a, z, self.code_bits, group_size, **mw)
        return a, z

    @property
    def signed_scales(self) -> bool:
        """The gguf layout signs each group's scale (``numerics.extreme_signs``)."""
        return self.layout == "gguf"

    def flip_signs(self, w: np.ndarray, group_size: int | None) -> np.ndarray | None:
        """With signed scales: ``w`` (a float32 scratch buffer) times each group's
        ``numerics.extreme_signs`` in place, and those signs; else None and ``w`` untouched.

        Quantizing the flipped ``w`` with positive scales gives the codes of ``w`` with the scales
        times the signs, so every parameter search runs unchanged on the flipped weights."""
        if not self.signed_scales:
            return None
        sign = numerics.extreme_signs(w, group_size)
        w *= numerics.expand_groups(sign, w.shape[1], group_size)
        return sign

    def writer_options(self) -> dict:
        """``CheckpointWriter`` keywords this spec needs (the extension signed scales require)."""
        return {"must_understand": [C.EXT_SIGNED_SCALES]} if self.signed_scales else {}

    def _nest(self, a: np.ndarray, width: int, group_size: int | None, cols: int | None) -> np.ndarray:
        if self.layout != "gguf":
            return a
        if cols is None:  # rows of the tensor as they are
            return numerics.nest_scales(a, width, group_size)
        return numerics.nest_scales(a.reshape(-1, cols // width), cols, width).reshape(a.shape)

    def entry_options(self) -> dict:
        """How the writer stores tensors quantized with this spec (``add_quantized*`` keywords)."""
        return {
            "group_size": self.group_size,
            "scheme": self.scheme,
            "scale_dtype": self.scale_dtype,
            "zero_dtype": "U8" if self.code_bits <= 8 else "U16",
            "extra_precision": self.extra_precision,
        }

    def source_record(self) -> dict:
        return {
            "code_bits": self.code_bits,
            "group_size": self.group_size,
            "scheme": self.scheme,
            "zero_multiple": self.zero_multiple,
            "objective": self.objective,
            **(
                {"widths": list(self.widths), "lambdas": list(self.lambdas)}
                if self.objective != "minmax"
                else {}
            ),
            "scale_dtype": self.scale_dtype,
            **({"layout": self.layout} if self.layout != "free" else {}),
        }


_scratch = threading.local()


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


class _WriteBehind:
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
        self._failed = False
        self._progress = progress

    def _pop(self) -> None:
        fut, nbytes = self._pending[0]
        fut.result()
        self._pending.popleft()
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

    def put(self, job: Callable[[], None], nbytes: int) -> Future:
        """Queue ``job`` after the ones before it (and report the jobs that have run)."""
        while self._pending and self._pending[0][0].done():
            self._pop()
        fut = self._io.submit(self._run, job)
        self._pending.append((fut, nbytes))
        return fut

    def wait(self, fut: Future | None) -> None:
        """Wait until ``fut`` (and so every job before it) has run."""
        while fut is not None and any(f is fut for f, _ in self._pending):
            self._pop()

    def __enter__(self) -> _WriteBehind:
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


def _copy_dense(writer: mf.CheckpointWriter, src: HFSource, name: str) -> None:
    """Store a tensor as it came, copied file to file by the kernel: a queued one holds no memory."""
    t = src.tensors[name]
    writer.add_dense_from_file(name, *src.location(name), t.dtype, t.shape)


def quantize_hf(
    hf_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    code_bits: int = C.DEFAULT_CODE_BITS,
    group_size: int | None | str = BY_LAYOUT,
    scheme: str | None = None,
    zero_multiple: int | str = 1,
    layers: str = "ffn",
    objective: str | None = None,
    widths: Sequence[int] | None = None,
    lambdas: Sequence[float] | None = None,
    extra_precision: Sequence[int] = (),
    scale_dtype: str = "F16",
    layout: str = "gguf",
    threads: int | None = None,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    calib: str | os.PathLike | None = None,
    calib_tokens: int | None = None,
    calib_seq_len: int | None = None,
    calib_propagate: str = "per-width",
    device: str = "cpu",
    layer_progress: Callable[[int, int], None] | None = None,
) -> Path:
    """Quantize a Hugging Face safetensors folder into a matq checkpoint folder at ``out``.

    ``layers``: ``ffn`` (the paper's default), ``attention``, ``linear`` (both), or a regular
    expression over tensor names. ``zero_multiple``: an integer power of two, or ``"slice-exact"``
    so every width in ``widths`` has an integer zero point. ``objective="multiwidth"`` rounds each
    weight for the lambda-weighted error of its ``widths`` slices and picks scales for it too.
    ``progress`` is called with the source bytes of each tensor once it is written.

    ``calib`` (a text file or folder): run the model on that text (``calib_tokens`` tokens at most,
    default 131072, in sequences of ``calib_seq_len``, default 512) on ``device`` and quantize the
    selected linears with multi-width GPTQ (``matq_converters.calibrated``; ``layer_progress(done,
    total)`` after each layer). Its default widths and lambdas are ``CALIBRATED_WIDTHS`` and
    ``noise_equal_lambdas`` (``matq_format.multiwidth``).
    """
    hf_dir, out = Path(hf_dir), Path(out)
    spec = QuantizeSpec.build(
        code_bits=code_bits,
        group_size=group_size,
        scheme=scheme,
        zero_multiple=zero_multiple,
        objective=objective,
        widths=widths,
        lambdas=lambdas,
        extra_precision=extra_precision,
        scale_dtype=scale_dtype,
        layout=layout,
        calibrated=calib is not None,
    )
    src = HFSource(hf_dir)
    arch = architectures.detect(src.config)
    selected = set(architectures.select(src.shapes(), layers, arch, path=str(hf_dir)))
    skipped = architectures.unquantized(src.shapes(), layers, arch)
    if skipped:  # named like the selected layers, but 1-D, 3-D or integer: say so, not silently
        warnings.warn(UnquantizedWarning(skipped), stacklevel=2)
    source = {
        "tool": "matq quantize",
        "model": hf_dir.name,
        "model_type": src.config.get("model_type"),
        "architecture": arch.name,
        "layers": layers,
        "quantized_tensors": len(selected),
        **spec.source_record(),
    }
    if calib is not None:
        from .calibrated import quantize_calibrated

        return quantize_calibrated(
            src,
            out,
            spec,
            selected,
            source,
            calib=calib,
            calib_tokens=calib_tokens,
            calib_seq_len=calib_seq_len,
            device=device,
            propagate=calib_propagate,
            overwrite=overwrite,
            progress=progress,
            layer_progress=layer_progress,
        )
    n_threads = max(1, threads or min(8, os.cpu_count() or 1))
    # Two plane buffers, taken in turns: the writer thread stores one tensor's planes while the next
    # is packed into the other, once the job that last used it has run.
    sizes = [mf_planes.plane_stride(int(np.prod(src.tensors[n].shape))) for n in selected]
    plane_bufs: list[tuple[np.ndarray, Future | None]] = [(np.empty(0, np.uint8), None)] * 2
    plane_cap = code_bits * max(sizes, default=0)
    with (
        ThreadPoolExecutor(n_threads, thread_name_prefix="matq-quantize") as pool,
        mf.CheckpointWriter(
            out,
            code_bits,
            carry_from=hf_dir,
            source=source,
            overwrite=overwrite,
            expected_tensors=len(src.tensors),
            inputs=src.roots,
            **spec.writer_options(),
        ) as writer,
        _WriteBehind(progress) as sink,
    ):
        for name in src:
            t = src.tensors[name]
            if name not in selected:
                sink.put(functools.partial(_copy_dense, writer, src, name), t.nbytes)
                continue
            buf, last = plane_bufs.pop(0)
            sink.wait(last)
            if buf.size < plane_cap:  # allocated once, at the largest tensor's size
                buf = np.empty(plane_cap, np.uint8)
            n = int(np.prod(t.shape))
            planes = buf[: code_bits * mf_planes.plane_stride(n)].reshape(code_bits, -1)
            scale, zero = quantize_tensor_planes(
                src.read(name), spec, planes, name=name, path=t.file, pool=pool
            )
            write = functools.partial(
                writer.add_quantized_planes,
                name,
                dict(enumerate(planes)),
                scale,
                zero,
                shape=t.shape,
                dtype=t.dtype,
                **spec.entry_options(),
            )
            plane_bufs.append((buf, sink.put(write, t.nbytes)))
    return out


@dataclass(frozen=True)
class HFImportOptions:
    """Settings of ``--from hf`` (the keywords of :func:`quantize_hf`, checked by ``QuantizeSpec.build``)."""

    code_bits: int = option(C.DEFAULT_CODE_BITS, "Bits of the stored codes.")
    group_size: int | None | str = option(
        BY_LAYOUT, "Input columns per scale; None per channel; by-layout: 32 in the gguf layout, else 128."
    )
    scheme: str | None = option(
        None,
        "Zero points (None: symmetric in the gguf layout, else asymmetric).",
        choices=("asymmetric", "symmetric"),
    )
    zero_multiple: int | str = option(1, "Zero points on multiples of this power of two, or slice-exact.")
    layers: str = option("ffn", "ffn, attention, linear, or a regular expression over tensor names.")
    objective: str | None = option(
        None, "Rounding and scale objective (None: multiwidth with calib, else minmax).", choices=OBJECTIVES
    )
    widths: tuple[int, ...] | None = option(None, "Target widths of multiwidth and slice-exact.")
    lambdas: tuple[float, ...] | None = option(None, "One weight per width.")
    extra_precision: tuple[int, ...] = option((), "Widths served with the extra bucket.")
    scale_dtype: str = option("F16", "Scale dtype.", choices=("F16", "BF16", "F32"))
    layout: str = option("gguf", "gguf: every width exact in llama.cpp's compact types; free: any scheme.", choices=LAYOUTS)
    threads: int | None = option(None, "Worker threads.")
    calib: str | os.PathLike | None = option(None, "Calibration text: multi-width GPTQ.")
    calib_tokens: int | None = option(None, "Calibration tokens at most.")
    calib_propagate: str = option("per-width", "GPTQ error feedback.", choices=("mean", "per-width"))
    device: str = option("cpu", "Where calibration runs.")


class HFImporter:
    """``--from hf``: post-training quantization of a float Hugging Face model (:func:`quantize_hf`)."""

    name = "hf"
    description = "a float Hugging Face model (PTQ)"
    dependencies = ("numpy", "safetensors")
    Options = HFImportOptions

    def run(self, src, out, settings: HFImportOptions, **kw) -> Path:
        """``kw``: overwrite, progress, layer_progress, as :func:`quantize_hf` takes them."""
        return quantize_hf(src, out, **dataclasses.asdict(settings), **kw)
