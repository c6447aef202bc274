"""Calibrated quantization (``matq quantize --calib``): multi-width GPTQ from a calibration pass.

    quantize_hf("SmolLM2-135M", "out", layers="linear", calib="docs/", calib_tokens=65536)

The selected linears inside the model's layers are quantized by
:func:`~matq_converters.gptq.gptq_multiwidth` from the Hessians a layer-by-layer pass over the
calibration text collects (:mod:`~matq_converters.calibration`); selected tensors outside the
layers (a pattern naming the head, say) are quantized as without ``--calib``; the rest are copied
as stored. The output is an ordinary matq checkpoint from the same writer; the manifest's
``source`` records the calibration (text name, files, bytes, sha256, tokens, sequence length,
device, GPTQ block size and damping).

The per-column importance (``diag(H)``, mean ``x_j^2`` over the calibration tokens) is not stored:
the format has no entry for it; an extension would be a spec question.
"""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

import matq_format as mf
from matq_format import multiwidth, numerics

from .hf_source import HFSource
from .quantize import NonFiniteWeightError, OptionError, QuantizeSpec, _copy_dense, quantize_tensor

__all__ = ["quantize_calibrated", "weighted_multiwidth_params"]


def weighted_multiwidth_params(
    w: np.ndarray,
    importance: np.ndarray | None,
    code_bits: int,
    group_size: int | None,
    widths=multiwidth.MULTIWIDTH_WIDTHS,
    lambdas=multiwidth.MULTIWIDTH_LAMBDAS,
    *,
    symmetric: bool = False,
    zero_multiple: int = 1,
    scale_dtype: str = "F16",
    extra_precision=False,
    grid=multiwidth.MULTIWIDTH_GRID,
    refine=multiwidth.MULTIWIDTH_REFINE,
) -> tuple[np.ndarray, np.ndarray]:
    """:func:`multiwidth.multiwidth_params` with each input column's error weighted by ``importance``.

    The same candidates (``minmax_params`` of the range times each factor of ``grid``, then the
    refinement steps) scored by ``sum_j importance_j * sum_r lambda_r (w_j - w_hat_rj)^2`` per row or
    group (the per-weight costs come from ``multiwidth.multiwidth_cost``), as llama.cpp weights its
    scale search with an importance matrix. ``importance`` None, or equal for every column, is
    exactly ``multiwidth.multiwidth_params``.
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError("quantized tensors are 2-D [rows, cols]")
    rows, cols = w.shape
    imp = None if importance is None else np.asarray(importance, np.float64).reshape(-1)
    mw = dict(symmetric=symmetric, zero_multiple=zero_multiple, scale_dtype=scale_dtype)
    if imp is None or imp.size == 0 or bool(np.all(imp == imp[0])):
        return multiwidth.multiwidth_params(
            w, code_bits, group_size, widths, lambdas, extra_precision=extra_precision, grid=grid,
            refine=refine, **mw,
        )  # fmt: skip
    if imp.size != cols:
        raise ValueError(f"importance has {imp.size} entries for {cols} columns")
    g = cols if group_size is None else min(group_size, max(cols, 1))
    pad = (-cols) % g
    wg = (np.pad(w, ((0, 0), (0, pad)), mode="edge") if pad else w).reshape(rows, -1, g)
    ends = np.stack([np.minimum(wg.min(axis=2), 0.0), np.maximum(wg.max(axis=2), 0.0)], axis=-1)
    weight = np.pad(np.maximum(imp, 0.0), (0, pad)).reshape(1, -1, g)  # padding columns weigh 0
    col_group = np.arange(cols) // g
    shape = ends.shape[:2]

    def score(f: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        a, z = numerics.minmax_params((ends * f[..., None]).reshape(-1, 2), code_bits, None, **mw)
        a, z = a.reshape(shape), z.reshape(shape)
        _, e = multiwidth.multiwidth_cost(
            w, a[:, col_group], z[:, col_group], code_bits, 1, widths, lambdas, extra_precision, exact=False
        )  # per weight: its lambda-weighted squared error
        e = np.pad(e, ((0, 0), (0, pad))).reshape(rows, -1, g)
        return a, z, (e * weight).sum(axis=2)

    return multiwidth.search_range_factors(score, shape, grid, refine)


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
) -> Path:
    """Write the checkpoint of :func:`~matq_converters.quantize.quantize_hf` with ``calib`` given.

    ``src``, ``spec``, ``selected`` and ``source`` are what ``quantize_hf`` resolved; ``source`` gains
    a ``calibration`` record. Text and model are checked before anything is written.
    ``progress(source bytes)`` is called per tensor written, ``layer_progress(done, total)`` per layer.
    """
    from . import calibration as cal
    from .gptq import DEFAULT_BLOCK_SIZE, DEFAULT_DAMP, PROPAGATE

    if propagate not in PROPAGATE:
        raise OptionError(None, f"unknown propagation {propagate!r}; use {' or '.join(PROPAGATE)}")
    dev = cal.resolve_device(device)
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
    }

    def add(writer, name, codes, scale, zero) -> None:
        t = src.tensors[name]
        writer.add_quantized(
            name,
            codes,
            scale,
            zero,
            dtype=t.dtype,
            **spec.entry_options(),
        )
        if progress is not None:
            progress(t.nbytes)

    def nonfinite(name: str) -> Exception:
        return NonFiniteWeightError(src.tensors[name].file, f"{name}: holds NaN or infinity")

    with mf.CheckpointWriter(
        out,
        spec.code_bits,
        carry_from=src.root,
        source=source,
        overwrite=overwrite,
        expected_tensors=len(src.tensors),
        inputs=src.roots,
        **spec.writer_options(),
    ) as writer:
        for name in src:
            if name not in selected:
                _copy_dense(writer, src, name)
                if progress is not None:
                    progress(src.tensors[name].nbytes)
        for name in data_free:
            t = src.tensors[name]
            codes, scale, zero = quantize_tensor(src.read(name), spec, name=name, path=t.file)
            add(writer, name, codes, scale, zero)
        for name, codes, scale, zero in cal.calibrate_layers(
            model, text, plans, spec, propagate=propagate, on_layer=layer_progress, nonfinite=nonfinite
        ):
            add(writer, name, codes, scale, zero)
    return Path(out)
