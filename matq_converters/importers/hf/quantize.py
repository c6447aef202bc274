"""Post-training quantization of a Hugging Face model folder into a matq checkpoint, without data.

    from matq_converters.importers.hf.quantize import quantize_hf
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
import os
import warnings
from collections.abc import Callable, Mapping
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np

from matq_converters import roles as architectures
from matq_converters.importers.hf.options import HFImportOptions
from matq_converters.importers.hf.ptq import (
    NonFiniteWeightError,
    WriteBehind,
    checkpoint_writer,
    copy_dense,
    quantize_stack_planes,
    worker_threads,
)
from matq_converters.importers.hf.source import HFSource
from matq_converters.registry import (
    ConvertOptionError,
    MissingDependencyError,
    missing_modules,
    typed_options,
)
from matq_format import planes as mf_planes
from matq_format.errors import printable
from matq_format.quantspec import OptionError, QuantizeSpec

__all__ = [
    "GenericRulesWarning",
    "HFImportOptions",
    "HFImporter",
    "SelectionWarning",
    "UnquantizedWarning",
    "quantize_hf",
]


class SelectionWarning(UserWarning):
    """What the layer selection did that the user should hear of (the CLI prints each on one line)."""


class GenericRulesWarning(SelectionWarning):
    """A model family not in the table of roles: the generic naming rules chose the tensors."""

    def __init__(self, model_type: str, selected: dict[str, list[str]]):
        self.model_type, self.selected = model_type, {r: list(n) for r, n in selected.items()}
        super().__init__(model_type, self.selected)

    def __str__(self) -> str:
        parts = ", ".join(f"{len(n)} {role} (e.g. {printable(n[0])})" for role, n in self.selected.items())
        return f"model type {printable(self.model_type)!s} is not in the table of roles; generic rules selected {parts}"


class UnquantizedWarning(SelectionWarning):
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


def quantize_hf(
    hf_dir: str | os.PathLike,
    out: str | os.PathLike,
    options: HFImportOptions | Mapping[str, Any] | None = None,
    *,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    layer_progress: Callable[[int, int], None] | None = None,
    **settings: Any,
) -> Path:
    """Quantize a Hugging Face safetensors folder into a matq checkpoint folder at ``out``.

    ``options`` and ``settings`` (keywords, over ``options``) are :class:`HFImportOptions`' fields,
    checked by ``registry.typed_options`` (an unknown name is refused) and ``QuantizeSpec.build``.
    ``layers``: ``ffn`` (the paper's default), ``attention``, ``linear`` (both), or a regular
    expression over tensor names. ``zero_multiple``: an integer power of two, or ``"slice-exact"``
    so every width in ``widths`` has an integer zero point. ``objective="multiwidth"`` rounds each
    weight for the lambda-weighted error of its ``widths`` slices and picks scales for it too.
    ``progress`` is called with the source bytes of each tensor once it is written.

    ``calib`` (a text file or folder): run the model on that text (``calib_tokens`` tokens at most,
    default 8192, in sequences of ``calib_seq_len``, default 512) on ``device`` and quantize the
    selected linears with multi-width GPTQ (``matq_converters.importers.hf.calibrated``; ``layer_progress(done,
    total)`` after each layer). Its default widths and lambdas are ``CALIBRATED_WIDTHS`` and
    ``calibrated_lambdas`` (``matq_format.multiwidth``).
    """
    opts = _checked(options, settings)
    hf_dir, out = Path(hf_dir), Path(out)
    spec = opts.spec()
    own = opts.own_widths()
    if any(not 1 <= r < spec.code_bits for r in own):
        raise OptionError(None, f"--width-params: widths must lie in 1..{spec.code_bits - 1}, got {list(own)}")
    src = HFSource(hf_dir)
    selected, source = _select(src, opts.layers, spec)
    if opts.calib is not None:
        return _calibrated(src, out, spec, selected, source, opts, overwrite, progress, layer_progress)
    return _data_free(src, out, spec, selected, source, opts.threads, overwrite, progress, own)


def _select(src: HFSource, layers: str, spec: QuantizeSpec) -> tuple[dict[str, int], dict]:
    """The tensors ``layers`` selects with each one's input axis, and the manifest's ``source``
    record of the run; warns of tensors named like the selected layers but not quantizable (1-D,
    integer, biases), and of generic rules used for a family the table does not know."""
    arch = architectures.detect(src.config)
    shapes, root = src.shapes(), str(src.root)
    names = architectures.select(shapes, layers, arch, path=root)
    selected = architectures.input_axes(
        shapes, names, arch, architectures.hidden_size(src.config), path=root
    )
    if arch is architectures.GENERIC and layers in architectures.PRESETS:
        by_role: dict[str, list[str]] = {}
        for n in names:
            by_role.setdefault(arch.role(n), []).append(n)
        warnings.warn(GenericRulesWarning(str(src.config.get("model_type")), by_role), stacklevel=3)
    skipped = architectures.unquantized(shapes, layers, arch)
    if skipped:  # say so, not silently
        warnings.warn(UnquantizedWarning(skipped), stacklevel=3)
    source = {
        "tool": "matq quantize",
        "model": src.root.name,
        "model_type": src.config.get("model_type"),
        "architecture": arch.name,
        "layers": layers,
        "quantized_tensors": len(selected),
        **spec.source_record(),
    }
    return selected, source


def _checked(
    options: HFImportOptions | Mapping[str, Any] | None, settings: dict[str, Any]
) -> HFImportOptions:
    """``options`` with ``settings`` over them, checked (names, types, choices) into HFImportOptions;
    raises :class:`OptionError`, as ``QuantizeSpec.build`` does for the rest."""
    base = dataclasses.asdict(options) if isinstance(options, HFImportOptions) else dict(options or {})
    try:
        return typed_options(HFImportOptions, {**base, **settings}, "quantize_hf")
    except ConvertOptionError as exc:
        raise OptionError(exc.path, exc.message) from None


def _calibrated(
    src: HFSource,
    out: Path,
    spec: QuantizeSpec,
    selected: dict[str, int],
    source: dict,
    opts: HFImportOptions,
    overwrite: bool,
    progress: Callable[[int], None] | None,
    layer_progress: Callable[[int, int], None] | None,
) -> Path:
    """``--calib``: multi-width GPTQ (``calibrated``), once torch and transformers are known present."""
    missing = missing_modules(("torch", "transformers"))
    if missing:
        raise MissingDependencyError(None, f"--calib needs {', '.join(missing)}; pip install 'matq[hf]'")
    from matq_converters.importers.hf.calibrated import quantize_calibrated

    return quantize_calibrated(
        src,
        out,
        spec,
        set(selected),
        source,
        input_axes=selected,
        calib=opts.calib,
        calib_tokens=opts.calib_tokens,
        calib_seq_len=opts.calib_seq_len,
        device=opts.device,
        propagate=opts.calib_propagate,
        threads=opts.threads,
        overwrite=overwrite,
        progress=progress,
        layer_progress=layer_progress,
        width_params=opts.own_widths(),
    )


class _PlaneBuffers:
    """Two plane buffers, taken in turns: the writer thread stores one tensor's planes while the next
    is packed into the other, once the job that last used it has run. Each is allocated once, at
    the largest selected tensor's size."""

    def __init__(self, code_bits: int, stride: int):
        self.code_bits = code_bits
        self._cap = code_bits * stride
        self._free: list[tuple[np.ndarray, int | None]] = [(np.empty(0, np.uint8), None)] * 2
        self._taken = self._free[0][0]

    def take(self, sink: WriteBehind, numel: int) -> np.ndarray:
        """Planes ``[code_bits, plane_stride(numel)]`` in the buffer whose last write has run."""
        buf, last = self._free.pop(0)
        sink.wait(last)
        if buf.size < self._cap:
            buf = np.empty(self._cap, np.uint8)
        self._taken = buf
        return buf[: self.code_bits * mf_planes.plane_stride(numel)].reshape(self.code_bits, -1)

    def written_by(self, ticket: int) -> None:
        """The buffer last taken is free again once job ``ticket`` has run."""
        self._free.append((self._taken, ticket))


def _data_free(
    src: HFSource,
    out: Path,
    spec: QuantizeSpec,
    selected: dict[str, int],
    source: dict,
    threads: int | None,
    overwrite: bool,
    progress: Callable[[int], None] | None,
    own: tuple[int, ...] = (),
) -> Path:
    """Selected tensors quantized in row blocks on ``threads`` workers, written behind; the rest copied.
    Widths ``own`` get their own block parameters (spec 10.7), fitted with uniform importance."""
    n_threads = worker_threads(threads)
    strides = [mf_planes.plane_stride(int(np.prod(src.tensors[n].shape))) for n in selected]
    bufs = _PlaneBuffers(spec.code_bits, max(strides, default=0))
    with (
        ThreadPoolExecutor(n_threads, thread_name_prefix="matq-quantize") as pool,
        checkpoint_writer(src, out, spec, source, overwrite) as writer,
        WriteBehind(progress) as sink,
    ):
        for name in src:
            t = src.tensors[name]
            if name not in selected:
                sink.put(functools.partial(copy_dense, writer, src, name), t.nbytes)
                continue
            planes = bufs.take(sink, int(np.prod(t.shape)))
            scale, zero = quantize_stack_planes(
                src.read(name), spec, planes, selected[name], name=name, path=t.file, pool=pool
            )
            # fitted on a worker while the next tensor is quantized; written once fitted
            wp = pool.submit(_own_params, src, name, planes, spec, selected[name], own) if own else None
            write = functools.partial(
                _add_quantized,
                writer,
                name,
                dict(enumerate(planes)),
                scale,
                zero,
                shape=t.shape,
                dtype=t.dtype,
                input_axis=selected[name],
                width_params=wp,
                **spec.entry_options(),
            )
            bufs.written_by(sink.put(write, t.nbytes))
    return out


def _add_quantized(writer, name: str, planes: dict, scale, zero, width_params: Future | None = None, **kw) -> None:
    """``writer.add_quantized_planes`` once the tensor's own width parameters (if any) are fitted."""
    wp = None if width_params is None else width_params.result()
    writer.add_quantized_planes(name, planes, scale, zero, width_params=wp, **kw)


def _own_params(src: HFSource, name: str, planes: np.ndarray, spec: QuantizeSpec, axis: int, own) -> dict:
    """Widths ``own`` of one tensor fitted to the codes just packed (spec 10.7)."""
    from matq_converters.importers.hf.widthfit import fit_tensor

    t = src.tensors[name]
    q = mf_planes.unpack(list(planes), int(np.prod(t.shape)), spec.code_bits, spec.code_bits).reshape(t.shape)
    w = np.asarray(src.read(name), np.float32)
    try:
        return fit_tensor(w, q, spec.code_bits, own, spec.scheme == "symmetric", axis, name=name)
    except ValueError as exc:
        raise NonFiniteWeightError(t.file, str(exc)) from None


class HFImporter:
    """``--from hf``: post-training quantization of a float Hugging Face model (:func:`quantize_hf`)."""

    name = "hf"
    description = "a float Hugging Face model (PTQ)"
    Options = HFImportOptions

    def run(self, src, out, settings: HFImportOptions, **kw) -> Path:
        """``kw``: overwrite, progress, layer_progress, as :func:`quantize_hf` takes them."""
        return quantize_hf(src, out, settings, **kw)
