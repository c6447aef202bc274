"""Import a MatGPTQ checkpoint (IST-DASLab, arXiv 2602.03537) into a matq checkpoint.

MatGPTQ's packed Hugging Face layout, per quantized linear layer ``<prefix>``:
``<prefix>.qweight`` uint8 ``[out, in]`` (one master-width code per byte), ``<prefix>.scales``
float16 or bfloat16 ``[out, in / group_size]``, no zero tensor (symmetric, zero ``2^(m-1)`` = 128).
``config.json`` carries ``quantization_config = {quant_method: "matgptq_quant", group_size,
master_bitwidth, inference_bitwidth, ...}``. Its slicing at width r is MatQuant's Eq. 6 and its
dequantization ``scale * (S(q, r) - 128)``, which is exactly matq's: codes and scales are copied
as they are, so every width dequantizes to the same numbers.

The result names the tensor ``<prefix>.weight`` (the float model's name, which every exporter
expects) and drops ``quantization_config`` from the carried ``config.json``; the original is kept
in the manifest's ``source`` record.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path

import numpy as np

import matq_format as mf
from matq_converters.importers.hf.source import HFSource, SourceError
from matq_converters.registry import NoOptions
from matq_format import constants as C
from matq_format.publish import scratch_dir
from matq_format.writer import carried_sources

__all__ = ["MatGPTQLayoutError", "NotMatGPTQError", "import_matgptq", "read_matgptq_config"]

QUANT_METHOD = "matgptq_quant"
_TORCH_DTYPES = {"float16": "F16", "bfloat16": "BF16", "float32": "F32"}


class NotMatGPTQError(SourceError):
    """The folder is a model, but its config does not declare ``quant_method: matgptq_quant``."""

    hint = "use `matq quantize` for a float model"


class MatGPTQLayoutError(SourceError):
    """The tensors do not follow MatGPTQ's packed layout (qweight/scales shapes, dtypes, pairs)."""


def read_matgptq_config(src: HFSource) -> dict:
    """The checked ``quantization_config``: method, group size, master width."""
    qc = src.config.get("quantization_config")
    cfg_path = src.root / "config.json"
    if not isinstance(qc, dict) or qc.get("quant_method") != QUANT_METHOD:
        found = qc.get("quant_method") if isinstance(qc, dict) else None
        raise NotMatGPTQError(
            cfg_path, f"quantization_config.quant_method is {found!r}, not {QUANT_METHOD!r}"
        )
    g, m = qc.get("group_size"), qc.get("master_bitwidth", 8)
    if type(g) is not int or g < 1:
        raise MatGPTQLayoutError(cfg_path, f"quantization_config.group_size {g!r} must be a positive integer")
    if type(m) is not int or not C.MIN_CODE_BITS <= m <= C.MAX_CODE_BITS_IMPL:
        raise MatGPTQLayoutError(
            cfg_path, f"master_bitwidth {m!r} outside {C.MIN_CODE_BITS}..{C.MAX_CODE_BITS_IMPL}"
        )
    return qc


def _plan(src: HFSource, group_size: int, master: int) -> dict[str, str]:
    """``{qweight name: scales name}``, after checking every pair against the layout."""
    pairs = {}
    for name, t in src.tensors.items():
        if not name.endswith(".qweight"):
            continue
        prefix = name[: -len(".qweight")]
        sname = prefix + ".scales"
        s = src.tensors.get(sname)
        where = t.file
        if t.dtype != "U8" or len(t.shape) != 2:
            raise MatGPTQLayoutError(where, f"{name} is {t.dtype}{list(t.shape)}, expected U8 [out, in]")
        if s is None:
            raise MatGPTQLayoutError(where, f"{name} has no {sname}")
        groups = -(-t.shape[1] // group_size)
        if s.dtype not in ("F16", "BF16", "F32") or s.shape != (t.shape[0], groups):
            raise MatGPTQLayoutError(
                s.file, f"{sname} is {s.dtype}{list(s.shape)}, expected F16/BF16 [{t.shape[0]}, {groups}]"
            )
        for clash in (prefix + ".weight", prefix + ".g_idx", prefix + ".perm", prefix + ".qzeros"):
            if clash in src.tensors:
                raise MatGPTQLayoutError(where, f"{clash} next to {name} is not part of the MatGPTQ layout")
        pairs[name] = sname
    if not pairs:
        raise MatGPTQLayoutError(src.root, "no <prefix>.qweight tensors found")
    orphans = [
        n
        for n in src.tensors
        if n.endswith(".scales") and n[: -len(".scales")] + ".qweight" not in src.tensors
    ]
    if orphans:
        raise MatGPTQLayoutError(src.tensors[orphans[0]].file, f"{orphans[0]} has no matching qweight")
    return pairs


def import_matgptq(
    src_dir: str | os.PathLike,
    out: str | os.PathLike,
    *,
    overwrite: bool = False,
    progress: Callable[[int], None] | None = None,
) -> Path:
    """Write the matq checkpoint of a MatGPTQ folder; dequantized weights match at every width."""
    src = HFSource(src_dir)
    qc = read_matgptq_config(src)
    g, master = qc["group_size"], qc.get("master_bitwidth", 8)
    pairs = _plan(src, g, master)
    scale_names = set(pairs.values())
    out = Path(out)
    weight_dtype = _TORCH_DTYPES.get(str(src.config.get("torch_dtype", "")))
    source = {"tool": "matq import-matgptq", "model": src.root.name, "quantization_config": qc}
    config = {k: v for k, v in src.config.items() if k != "quantization_config"}
    with scratch_dir("matgptq") as tmp:
        carry = {p.relative_to(src.root).as_posix(): p for p in carried_sources(src.root)}
        carry["config.json"] = tmp / "config.json"
        carry["config.json"].write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        with mf.CheckpointWriter(
            out,
            master,
            carry_from=carry,
            source=source,
            overwrite=overwrite,
            expected_tensors=len(src.tensors),
            inputs=src.roots,
        ) as w:
            for name, t in src.tensors.items():
                if name in scale_names:
                    continue
                if name not in pairs:
                    w.add_dense(name, src.read(name), t.dtype)
                    if progress is not None:
                        progress(t.nbytes)
                    continue
                s = src.tensors[pairs[name]]
                codes = src.read(name)
                if master < 8 and int(np.max(codes, initial=0)) >> master:
                    raise MatGPTQLayoutError(
                        t.file, f"{name} holds codes wider than master_bitwidth {master}"
                    )
                w.add_quantized(
                    name[: -len(".qweight")] + ".weight",
                    codes,
                    src.read(pairs[name]).astype(np.float32),
                    np.full(s.shape, float(1 << (master - 1)), np.float32),
                    dtype=weight_dtype or s.dtype,
                    group_size=g,
                    scheme="symmetric",
                    scale_dtype=s.dtype,
                    zero_dtype="U8",
                )
                if progress is not None:
                    progress(t.nbytes + s.nbytes)
    return out


class MatGPTQImporter:
    """``--from matgptq``: a MatGPTQ checkpoint, imported as it is (:func:`import_matgptq`)."""

    name = "matgptq"
    description = "a MatGPTQ checkpoint, imported as it is"
    Options = NoOptions

    def run(self, src, out, settings: NoOptions, **kw) -> Path:
        """``kw``: overwrite, progress."""
        return import_matgptq(src, out, **kw)
