"""Calibrated quantization (``matq quantize --calib``): multi-width GPTQ from a calibration pass.

    quantize_hf("SmolLM2-135M", "out", layers="linear", calib="docs/", calib_tokens=65536)

The selected linears inside the model's layers are quantized by
:func:`~matq_converters.importers.hf.gptq.gptq_multiwidth` from the Hessians a layer-by-layer pass over the
calibration text collects (:mod:`~matq_converters.importers.hf.calibration`); selected tensors outside the
layers (a pattern naming the head, say) are quantized as without ``--calib``; the rest are copied
as stored. The output is an ordinary matq checkpoint from the same writer; the manifest's
``source`` records the calibration (text name, files, bytes, sha256, tokens, sequence length,
device, GPTQ block size and damping).

Each calibrated linear keeps its per-column importance (``diag(H)``: mean ``x_j^2`` over the
calibration tokens) as ``t@importance`` (spec 10.8), and, in decoders, its per-output-feature
sensitivity (mean squared loss gradient at its output, from a layer-wise backward pass over the
first ``DEFAULT_SENSITIVITY_TOKENS`` tokens: :mod:`~matq_converters.importers.hf.sensitivity`) as
``t@sensitivity``, so that convert-time budgets weigh each tensor's error by what it does to the
output. Tensors quantized without data keep neither.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path

import numpy as np

from matq_converters.importers.hf.ptq import (
    NonFiniteWeightError,
    checkpoint_writer,
    copy_dense,
    quantize_stack,
    worker_threads,
)
from matq_converters.importers.hf.source import HFSource
from matq_format.quantspec import OptionError, QuantizeSpec
from matq_torch.device import resolve_device

__all__ = ["quantize_calibrated"]


def quantize_calibrated(
    src: HFSource,
    out: str | os.PathLike,
    spec: QuantizeSpec,
    selected: set[str] | list[str],
    source: dict,
    *,
    calib: str | os.PathLike,
    calib_tokens: int | None = None,
    calib_seq_len: int | None = None,
    device: str | None = "cpu",
    propagate: str = "per-width",
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
    layer_progress: Callable[[int, int], None] | None = None,
    input_axes: Mapping[str, int] | None = None,
    width_params: tuple[int, ...] = (),
    threads: int | None = None,
) -> Path:
    """Write the checkpoint of :func:`~matq_converters.importers.hf.quantize.quantize_hf` with ``calib`` given.

    ``src``, ``spec``, ``selected`` and ``source`` are what ``quantize_hf`` resolved; ``source`` gains
    a ``calibration`` record. Text and model are checked before anything is written.
    ``progress(source bytes)`` is called per tensor written, ``layer_progress(done, total)`` per layer.
    ``input_axes`` (``roles.input_axes``) says where a selected fused expert stack keeps its inputs;
    such stacks are no ``nn.Linear``, so they are quantized without data. ``width_params``: widths
    given their own block parameters (spec 10.7), fitted with the calibration's column importance.
    ``threads`` (default: CPUs, at most 8): on the CPU, how many of a layer's matrices GPTQ
    quantizes at once.
    """
    from matq_converters.importers.hf import calibration as cal
    from matq_converters.importers.hf.gptq import DEFAULT_BLOCK_SIZE, DEFAULT_DAMP, PROPAGATE
    from matq_converters.importers.hf.sensitivity import DEFAULT_SENSITIVITY_TOKENS, layer_sensitivity
    from matq_converters.importers.hf.widthfit import fit_tensor

    if propagate not in PROPAGATE:
        raise OptionError(None, f"unknown propagation {propagate!r}; use {' or '.join(PROPAGATE)}")
    dev = resolve_device(device)
    seq_len = cal.DEFAULT_SEQ_LEN if calib_seq_len is None else int(calib_seq_len)
    max_tokens = cal.DEFAULT_CALIB_TOKENS if calib_tokens is None else int(calib_tokens)
    model = cal.LayerwiseModel(src, dev)
    limit = getattr(model.config, "max_position_embeddings", None)
    if isinstance(limit, int) and limit > 0:
        seq_len = min(seq_len, limit)
    try:
        from transformers import AutoTokenizer

        tokenizer = AutoTokenizer.from_pretrained(src.root)
    except Exception as exc:  # no tokenizer files, or files transformers cannot read
        raise cal.CalibrationModelError(
            src.root, f"no tokenizer transformers can load ({type(exc).__name__}: {cal._first_line(exc)})"
        ) from None
    text = cal.load_calibration_text(tokenizer, calib, seq_len, max_tokens)
    plans, data_free = cal.plan_layers(model, [n for n in src if n in selected])
    first = text.tokens[: max(1, DEFAULT_SENSITIVITY_TOKENS // text.tokens.shape[1])]
    sens = layer_sensitivity(model, first, plans)
    if not all(np.isfinite(v).all() for v in sens.values()):
        sens = {}  # a weight holding NaN: the GPTQ pass names it; no tensor is compared on half the model
    source = dict(source)
    source["calibration"] = {
        **text.record(calib),
        "method": "gptq-multiwidth",
        "widths": list(spec.widths),
        "lambdas": list(spec.lambdas),
        "propagate": propagate,
        "device": dev.type,
        "block_size": DEFAULT_BLOCK_SIZE,
        "damp": DEFAULT_DAMP,
        "gptq_tensors": sum(len(p.linears) for p in plans),
        "sensitivity_tokens": int(first.size) if sens else 0,
    }

    axes = dict(input_axes or {})
    seen: dict[str, tuple] = {}

    def add(writer, name, codes, scale, zero) -> None:
        t = src.tensors[name]
        wp = None
        w, imp = seen.pop(name, None) or (None, None)
        if width_params:
            w = src.read(name) if w is None else w
            try:
                wp = fit_tensor(
                    w, codes, spec.code_bits, width_params, spec.scheme == "symmetric", axes.get(name, 1), imp, name
                )
            except ValueError as exc:
                raise NonFiniteWeightError(t.file, str(exc)) from None
        writer.add_quantized(
            name,
            codes,
            scale,
            zero,
            dtype=t.dtype,
            input_axis=axes.get(name, 1),
            width_params=wp,
            importance=imp,
            sensitivity=sens.get(name) if imp is not None else None,
            **spec.entry_options(),
        )
        if progress is not None:
            progress(t.nbytes)

    def nonfinite(name: str) -> Exception:
        return NonFiniteWeightError(src.tensors[name].file, f"{name}: holds NaN or infinity")

    with checkpoint_writer(src, out, spec, source, overwrite) as writer:
        for name in src:
            if name not in selected:
                copy_dense(writer, src, name)
                if progress is not None:
                    progress(src.tensors[name].nbytes)
        for name in data_free:
            t = src.tensors[name]
            codes, scale, zero = quantize_stack(src.read(name), spec, axes.get(name, 1), name=name, path=t.file)
            add(writer, name, codes, scale, zero)
        for name, codes, scale, zero in cal.calibrate_layers(
            model,
            text,
            plans,
            spec,
            propagate=propagate,
            on_layer=layer_progress,
            nonfinite=nonfinite,
            inputs=lambda n, w, imp: seen.__setitem__(n, (_numpy(w) if width_params else None, imp.cpu().numpy())),
            workers=worker_threads(threads),
        ):
            add(writer, name, codes, scale, zero)
    return Path(out)


def _numpy(t) -> np.ndarray:
    """A float32 numpy copy of a weight (on any device), owned by the caller."""
    import torch

    return t.to(torch.float32).cpu().numpy().copy()
