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
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

import matq_format as mf
from matq_converters import roles as architectures
from matq_converters.importers.hf.options import HFImportOptions
from matq_converters.importers.hf.ptq import WriteBehind, copy_dense, quantize_tensor_planes
from matq_converters.importers.hf.source import HFSource
from matq_converters.registry import MissingDependencyError, missing_modules
from matq_format import constants as C
from matq_format import planes as mf_planes
from matq_format.errors import printable
from matq_format.quantspec import BY_LAYOUT, QuantizeSpec

__all__ = [
    "HFImportOptions",
    "HFImporter",
    "UnquantizedWarning",
    "quantize_hf",
]


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
    selected linears with multi-width GPTQ (``matq_converters.importers.hf.calibrated``; ``layer_progress(done,
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
        missing = missing_modules(("torch", "transformers"))
        if missing:
            raise MissingDependencyError(None, f"--calib needs {', '.join(missing)}; pip install 'matq[hf]'")
        from matq_converters.importers.hf.calibrated import quantize_calibrated

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
        WriteBehind(progress) as sink,
    ):
        for name in src:
            t = src.tensors[name]
            if name not in selected:
                sink.put(functools.partial(copy_dense, writer, src, name), t.nbytes)
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


class HFImporter:
    """``--from hf``: post-training quantization of a float Hugging Face model (:func:`quantize_hf`)."""

    name = "hf"
    description = "a float Hugging Face model (PTQ)"
    Options = HFImportOptions

    def run(self, src, out, settings: HFImportOptions, **kw) -> Path:
        """``kw``: overwrite, progress, layer_progress, as :func:`quantize_hf` takes them."""
        return quantize_hf(src, out, **dataclasses.asdict(settings), **kw)
