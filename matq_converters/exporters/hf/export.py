"""Hugging Face export: a matq checkpoint at one width, or a Mix'n'Match plan, as a folder that
``transformers.AutoModel*.from_pretrained`` loads (``matq convert --to hf``).

Layouts (``--layout``):

- ``compressed-tensors`` (default): the compressed-tensors library's ``pack-quantized`` format.
  Each quantized linear layer is stored at its width in the smallest container of ``c >= r`` bits
  (``r + 1`` with extra precision, whose top bucket is ``2^r``) whose zero points are integers: the
  codes shifted up by ``m = c - r`` (``c - r - 1`` with extra precision), zero points ``z / 2^e``
  and float32 scales ``alpha * 2^e`` with ``e = 8 - r - m``, so that the library's dequantization
  ``(k_c - z_c) * s_c`` in float32 is ``alpha * (k * 2^(8-r) - z)`` bit for bit (every product is
  of an integer and a power of two). A tensor no container holds (odd zero points with extra
  precision, non-integer zero points, ragged groups) is written dequantized, and reported.
  ``--groups one`` (default) puts every packed tensor in one scheme, the widest container any of
  them needs, because transformers 5.24's ``dequantize`` path decompresses every dense module with
  the first config group's scheme (``get_dense_scheme``); ``--groups per-width`` gives each
  container its own group (smallest files, as vLLM reads them; transformers cannot load those).
  ``dequantize: true`` in the config, because transformers' compressed path cannot yet run
  asymmetric packed zero points (compressed-tensors #458/#459).
- ``dense``: the dequantized slice in each tensor's source dtype (or ``--dtype``): plain
  safetensors for any tool.
- ``gptq``: AutoGPTQ's v1 format (``hf_gptq``), written only where every slice is exact.

All stream tensor by tensor into transformers-style shards (``model-0000i-of-0000n.safetensors``
and an index), built in a temporary folder and published whole by ``AtomicOutput``; unquantized
tensors are copied file to file. Quantized tensors that are not weights of a ``Linear`` layer
(embeddings) are written dequantized.
"""

from __future__ import annotations

import importlib.util
import json
import math
import os
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from matq_converters import hfconfig
from matq_converters.exporters.containers import (
    container_bits,
    container_codes,
    container_scale_zero,
    pack_bytes,
)
from matq_converters.exporters.hf import gptq as hf_gptq
from matq_converters.exporters.hf.options import DTYPES, HFOptions
from matq_converters.registry import (
    ConvertOptionError,
    ConvertOptions,
    ConvertResult,
    MissingDependencyError,
    PlannedExporter,
    UnsupportedModelError,
    typed_options,
)
from matq_format import __version__ as MATQ_VERSION
from matq_format import dtypes
from matq_format.budget import BUDGET_PREFIX
from matq_format.container import SafetensorsWriter, read_header
from matq_format.errors import MatqError
from matq_format.plans import resolve_plan, summarize
from matq_format.publish import FILES_KEY, AtomicOutput, OutputKind, files_record, read_files_record
from matq_format.safefs import allowed_roots, check_file, read_bounded

FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")
WEIGHTS_NAME = "model.safetensors"
INDEX_NAME = "model.safetensors.index.json"
META_CONVERTER = "matq.converter"
INDEX_MAX_BYTES = 1 << 26
PACK_BLOCK = 1 << 20
"""Codes packed at a time: bounds the packing's scratch memory (a few bytes per code)."""


DENSE_OTHER = "not a linear layer's weight, or no exact container"
DENSE_STACKED = "fused experts: transformers' compressed-tensors loader takes experts only as 2-D weights, one per expert"
"""Why a quantized tensor of a packed layout is written dequantized: the warnings name each."""


class InexactError(ConvertOptionError):
    """``--exact`` was given and a tensor would not be stored bit for bit."""


class ExpertLayoutError(UnsupportedModelError):
    """An expert transformers could not load from a compressed-tensors folder; the message says why."""


class GPTQLayoutError(UnsupportedModelError):
    """A slice GPTQ cannot hold exactly (zero points, scales or shapes); the message says which."""


def _first_shard_metadata(path: Path) -> dict | None:
    """The metadata of the folder's first safetensors shard (regular files only, never waited on)."""
    try:
        if not path.is_dir() or not (path / "config.json").is_file():
            return None
        first = path / WEIGHTS_NAME
        if not os.path.lexists(first):
            index = json.loads(read_bounded(path / INDEX_NAME, INDEX_MAX_BYTES))
            first = path / sorted(set(index["weight_map"].values()))[0]
        check_file(first, allowed_roots(path))
        return read_header(first).metadata
    except (OSError, ValueError, KeyError, IndexError, TypeError, RecursionError, MatqError):
        return None


def is_hf_export(path: Path) -> bool:
    """Whether ``path`` is a folder this exporter wrote (its first shard names matq), for ``--force``."""
    meta = _first_shard_metadata(path)
    return meta is not None and META_CONVERTER in meta


def hf_export_files(path: Path) -> list[str] | None:
    """The files an export recorded writing (its first shard's ``matq.files``), for ``--force``."""
    return read_files_record(_first_shard_metadata(path))


HF_FOLDER = OutputKind("Hugging Face folder", True, is_hf_export, hf_export_files)


@dataclass
class _Plan:
    """What one source tensor becomes: output entries (name -> (dtype, shape)) and how."""

    name: str
    how: str
    """copy (as stored), float (dequantized or cast), packed (compressed-tensors), gptq."""
    entries: dict[str, tuple[str, tuple[int, ...]]]
    bits: int | None = None
    container: int | None = None
    symmetric: bool = False
    dtype: str | None = None
    expert: bool = False
    """One expert's weight, packed for transformers to merge into its fused experts."""
    why: str = ""
    """Why a quantized tensor is written dequantized (layouts other than dense)."""

    @property
    def nbytes(self) -> int:
        return sum(dtypes.np_dtype(d).itemsize * math.prod(s) for d, s in self.entries.values())


@dataclass
class _Prepared:
    opts: HFOptions
    cfg: dict
    plans: list[_Plan]
    widths: dict[str, int]
    extra_precision: bool
    groups: dict = field(default_factory=dict)
    ignore: list[str] = field(default_factory=list)
    gptq: dict = field(default_factory=dict)
    budget: str | None = None
    """The ``budget:BITS`` plan the widths were chosen for, if any."""


# --- planning: everything that can fail before a byte is written -----------------------------------
def _prepare(ckpt, options: ConvertOptions) -> _Prepared:
    """Check the request and plan every output entry."""
    opts = typed_options(HFOptions, options.settings, "--to hf")
    if (options.bits is None) == (options.plan is None):
        raise ConvertOptionError(ckpt.path, "give exactly one of bits or plan")
    _shard_bytes(opts.max_shard_size)
    cfg = ckpt.config
    if cfg is None:
        raise UnsupportedModelError(ckpt.path, "has no carried config.json; transformers cannot load it")
    names = ckpt.tensor_names()
    hfconfig.check(cfg, ((n, ckpt.info(n).shape) for n in names), ckpt.root / "config.json", UnsupportedModelError)
    spec = options.bits if options.plan is None else options.plan
    widths = resolve_plan(spec, ckpt, extra_precision=options.extra_precision)
    ep = options.extra_precision
    mods = _modules(cfg, ckpt.path) if opts.layout != "dense" else _Modules(set(), ())
    plans = [_plan_tensor(ckpt, n, widths.get(n), ep, opts, mods) for n in ckpt.tensor_names()]
    prep = _Prepared(opts, cfg, plans, widths, ep)
    if isinstance(options.plan, str) and options.plan.startswith(BUDGET_PREFIX):
        prep.budget = options.plan
    if opts.layout == "compressed-tensors":
        if opts.groups == "one":
            _one_scheme(ckpt, plans)
        packed = {p.name.removesuffix(".weight") for p in plans if p.how == "packed"}
        prep.groups = _config_groups(ckpt, plans, mods.expert_targets() if opts.groups == "one" else None)
        if prep.groups:
            _check_experts_packed(ckpt, plans, mods, ep)
        prep.ignore = sorted(mods.linear - packed)
    if opts.layout == "gptq":
        prep.gptq = _gptq_config(ckpt, plans, mods.linear)
    return prep


def _plan_tensor(ckpt, name: str, bits, ep: bool, opts: HFOptions, mods: _Modules) -> _Plan:
    """The output entries of one tensor under the chosen layout."""
    info = ckpt.info(name)
    if not info.quantized:
        if opts.dtype is None or info.dtype not in FLOAT_DTYPES or DTYPES[opts.dtype] == info.dtype:
            return _Plan(name, "copy", {name: (info.dtype, info.shape)})
        return _Plan(name, "float", {name: (DTYPES[opts.dtype], info.shape)}, dtype=DTYPES[opts.dtype])
    ep = ep and bits < ckpt.code_bits
    module = name.removesuffix(".weight")
    plan = None
    own = not ep and bits < ckpt.code_bits and ckpt.width_params(name, bits) is not None
    if own and opts.layout == "gptq":
        raise GPTQLayoutError(
            ckpt.path, f"{name}: width {bits} has its own block parameters (spec 10.7), which GPTQ cannot hold; use --layout dense"
        )
    if opts.layout != "dense" and module in mods.linear and name.endswith(".weight") and not own:
        pick = _gptq_plan if opts.layout == "gptq" else _packed_plan
        plan = pick(ckpt, name, module, bits, ep)
    elif opts.layout == "compressed-tensors" and mods.expert(name) and not own:
        plan = _packed_plan(ckpt, name, module, bits, ep, expert=True)
    if plan is None:  # dense, not a linear layer's weight, or no exact container: dequantized
        plan = _float_plan(ckpt, name, bits, opts, DENSE_STACKED if info.stacked else DENSE_OTHER)
    return plan


def _float_plan(ckpt, name: str, bits, opts: HFOptions, why: str) -> _Plan:
    """One quantized tensor written dequantized, in ``--dtype`` or its source float type."""
    info = ckpt.info(name)
    dtype = DTYPES[opts.dtype] if opts.dtype else _float_dtype(info.dtype)
    return _Plan(name, "float", {name: (dtype, info.shape)}, bits, dtype=dtype, why=why)


def _gptq_plan(ckpt, name: str, module: str, bits: int, ep: bool) -> _Plan:
    """GPTQ entries of one linear weight in its smallest exact container; refused if none is exact."""
    info = ckpt.info(name)
    g = info.group_size
    if g is not None and info.shape[1] % g:
        raise GPTQLayoutError(
            ckpt.path, f"{name}: {info.shape[1]} columns are not a multiple of the group size {g}"
        )
    z = ckpt.zero(name)
    c, why = hf_gptq.choose(z, ckpt.scale(name), ckpt.code_bits, bits, ep, info.shape)
    if not c:
        raise GPTQLayoutError(
            ckpt.path,
            f"{name}: GPTQ cannot hold width {bits}{' + extra' if ep else ''} exactly: {why} "
            "(--layout compressed-tensors can)",
        )
    sym = bool(np.all(z == np.float32(1 << (ckpt.code_bits - c + ep)) * (1 << (c - 1))))
    groups = 1 if g is None else info.shape[1] // g
    return _Plan(name, "gptq", hf_gptq.entries(module, info.shape, groups, c), bits, c, sym)


def _gptq_config(ckpt, plans: list[_Plan], linear: set[str]) -> dict:
    """The GPTQ ``quantization_config`` (one group size for the whole model)."""
    done = [p for p in plans if p.how == "gptq"]
    if not done:
        raise GPTQLayoutError(ckpt.path, "quantizes no linear layer, so a GPTQ folder would hold nothing")
    grids = {ckpt.info(p.name).group_size for p in done}
    if len(grids) > 1:
        raise GPTQLayoutError(ckpt.path, "GPTQ has one group size per model; these tensors use several")
    containers = {p.name.removesuffix(".weight"): p.container for p in done}
    skipped = sorted(linear - set(containers))
    sym = all(p.symmetric for p in done)
    return hf_gptq.config(containers, grids.pop() if grids else None, sym, skipped)


def _float_dtype(dtype: str) -> str:
    """Where a dequantized tensor goes when no ``--dtype`` is given: its source dtype, if a float."""
    return dtype if dtype in ("F32", "F16", "BF16") else "F32"


def _packed_plan(ckpt, name: str, module: str, bits: int, ep: bool, expert: bool = False) -> _Plan | None:
    """compressed-tensors entries of one linear weight (or one expert's, ``expert``) in its smallest
    exact container; None if none, or if an expert is not symmetric (:func:`_check_experts_packed`)."""
    info = ckpt.info(name)
    rows, cols = info.shape
    g = info.group_size
    z = ckpt.zero(name)
    c = container_bits(z, ckpt.code_bits, bits, ep)
    if c is None or (g is not None and cols % g):
        return None
    sym = not ep and bool(np.all(z == 2.0 ** (ckpt.code_bits - 1)))
    if expert and not sym:
        return None
    return _Plan(name, "packed", _packed_entries(module, info.shape, g, c, sym), bits, c, sym, expert=expert)


def _packed_entries(module: str, shape, g: int | None, c: int, sym: bool) -> dict:
    """compressed-tensors' names, dtypes and shapes for one linear layer in a ``c``-bit container."""
    rows, cols = shape
    groups = 1 if g is None else cols // g
    entries = {
        f"{module}.weight_packed": ("I32", (rows, math.ceil(cols * c / 32))),
        f"{module}.weight_scale": ("F32", (rows, groups)),
        f"{module}.weight_shape": ("I64", (2,)),
    }
    if not sym:
        entries[f"{module}.weight_zero_point"] = ("I32", (math.ceil(rows * c / 32), groups))
    return entries


def _check_experts_packed(ckpt, plans: list[_Plan], mods: _Modules, ep: bool) -> None:
    """transformers (5.25) merges per-expert weights of a compressed-tensors folder through its
    dequantize step, which takes only packed experts and decompresses them without zero points:
    one expert written otherwise makes the folder unloadable, so it is refused instead."""
    for p in plans:
        if p.how == "packed" or not mods.expert(p.name):
            continue
        info = ckpt.info(p.name)
        if not info.quantized:
            why = "is not quantized"
        elif info.group_size is not None and info.cols % info.group_size:
            why = f"has groups of {info.group_size} that do not divide its {info.cols} columns"
        elif ep and p.bits < ckpt.code_bits:
            why = "has extra precision, whose zero points are not symmetric"
        else:
            why = "has asymmetric zero points"
        raise ExpertLayoutError(
            ckpt.path,
            f"{p.name} {why}; transformers loads compressed-tensors experts only packed and symmetric (it "
            "decompresses them without zero points): quantize them with --scheme symmetric, or use --layout dense",
        )


def _one_scheme(ckpt, plans: list[_Plan]) -> None:
    """Every packed tensor in the widest container any needs (a wider one stays exact: the zero
    points only have to be integers at a finer step), asymmetric if any is. Experts form a scheme
    of their own (transformers' ``get_experts_scheme`` finds it by its ``re:`` targets)."""
    for expert in (False, True):
        packed = [p for p in plans if p.how == "packed" and p.expert == expert]
        grids = {ckpt.info(p.name).group_size for p in packed}
        if len(grids) > 1:
            raise UnsupportedModelError(
                ckpt.path,
                "tensors with different group sizes need one config group each; use --groups per-width",
            )
        c = max((p.container for p in packed), default=8)
        sym = all(p.symmetric for p in packed)
        for p in packed:
            info = ckpt.info(p.name)
            p.container, p.symmetric = c, sym
            p.entries = _packed_entries(p.name.removesuffix(".weight"), info.shape, info.group_size, c, sym)


def _config_groups(ckpt, plans: list[_Plan], expert_targets: list[str] | None = None) -> dict:
    """One compressed-tensors scheme per (container, symmetry, granularity), naming its modules;
    with ``expert_targets`` (``--groups one``) the experts' scheme names them by those patterns."""
    by_key: dict[tuple, list[str]] = {}
    for p in plans:
        if p.how == "packed":
            g = ckpt.info(p.name).group_size
            own = expert_targets is not None and p.expert
            by_key.setdefault((p.container, p.symmetric, g, own), []).append(p.name.removesuffix(".weight"))
    groups = {}
    # dense modules' schemes first: transformers' get_dense_scheme takes the first without expert targets
    for i, ((c, sym, g, own), targets) in enumerate(
        sorted(by_key.items(), key=lambda kv: (kv[0][3], -kv[0][0], kv[0][2] or 0))
    ):
        weights = {
            "num_bits": c,
            "type": "int",
            "symmetric": sym,
            "strategy": "channel" if g is None else "group",
            "group_size": g,
            "dynamic": False,
            "actorder": None,
            "observer": "minmax",
        }
        groups[f"group_{i}"] = {
            "targets": list(expert_targets) if own else targets,
            "weights": weights,
            "input_activations": None,
            "output_activations": None,
            "format": "pack-quantized",
        }
    return groups


@dataclass(frozen=True)
class _Modules:
    """What transformers' model class makes of a checkpoint's weights."""

    linear: set[str]
    """Names of its ``nn.Linear`` modules."""
    experts: tuple[str, ...]
    """Source patterns of per-expert 2-D weights (``.experts.*.w1.weight``) that its conversion
    mapping merges into fused experts, the dequantize step first: each is packed like a linear weight."""

    def expert(self, name: str) -> bool:
        return any(re.search(_pattern_regex(p) + "$", name) for p in self.experts)

    def expert_targets(self) -> list[str]:
        """compressed-tensors ``re:`` targets naming the expert modules."""
        return [f"re:.*{_pattern_regex(p.removesuffix('.weight'))}$" for p in self.experts]


def _pattern_regex(pattern: str) -> str:
    """A transformers conversion pattern (``*`` for an expert's number) as a regular expression."""
    return re.escape(pattern).replace(r"\*", r"\d+")


def _modules(cfg: dict, path) -> _Modules:
    """The config's model class, built on the meta device: its linear layers and expert weights."""
    missing = [m for m in ("torch", "transformers") if importlib.util.find_spec(m) is None]
    if missing:
        raise MissingDependencyError(
            None, f"--layout compressed-tensors and gptq need {', '.join(missing)}; pip install 'matq[hf]'"
        )
    import torch
    import transformers

    archs = cfg.get("architectures") or []
    cls = getattr(transformers, archs[0], None) if archs else None
    try:
        config = transformers.AutoConfig.for_model(**cfg)
        if cls is None:
            cls = transformers.AutoModel
        with torch.device("meta"):
            model = cls.from_config(config) if cls is transformers.AutoModel else cls._from_config(config)
    except Exception as exc:  # transformers' own errors: unknown type, values it cannot build, ...
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UnsupportedModelError(
            path, f"transformers cannot build model type {cfg.get('model_type')!r}: {first}"
        ) from None
    linear = {n for n, m in model.named_modules() if isinstance(m, torch.nn.Linear)}
    return _Modules(linear, _expert_patterns(model))


def _expert_patterns(model) -> tuple[str, ...]:
    """Source patterns of the model's weight converters that merge one ``.weight`` per expert
    (``mlp.experts.*.gate_proj.weight``): the ones transformers' compressed-tensors loader
    decompresses expert by expert (``HfQuantizer.update_weight_conversions``)."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter

    out = []
    for conv in get_model_conversion_mapping(model, add_legacy=False):
        sources = getattr(conv, "_original_source_patterns", None) or []
        if isinstance(conv, WeightConverter) and all(_per_expert(s) for s in sources):
            out += sources
    return tuple(out)


def _per_expert(pattern: str) -> bool:
    """One ``.weight`` per expert: transformers finds the experts' scheme by ``experts`` in its targets."""
    return pattern.endswith(".weight") and ".experts.*." in pattern


def _shard_bytes(text: str) -> int:
    """``50GB`` -> 50e9 (KB, MB, GB decimal; KiB, MiB, GiB binary), as transformers reads it."""
    m = re.fullmatch(r"\s*(\d+(?:\.\d+)?)\s*([KMG]i?B)?\s*", str(text), re.IGNORECASE)
    if not m:
        raise ConvertOptionError(None, f"max_shard_size {text!r} is not a size like 5GB or 500MB")
    unit = (m.group(2) or "B").upper()
    scale = {"B": 1, "KB": 10**3, "MB": 10**6, "GB": 10**9, "KIB": 1 << 10, "MIB": 1 << 20, "GIB": 1 << 30}
    size = int(float(m.group(1)) * scale[unit])
    if size <= 0:
        raise ConvertOptionError(None, f"max_shard_size {text!r} must be positive")
    return size


def _shards(plans: list[_Plan], limit: int) -> list[list[_Plan]]:
    """Tensors into shards in order, a new shard when the next tensor would pass ``limit``."""
    shards: list[list[_Plan]] = [[]]
    size = 0
    for p in plans:
        if shards[-1] and size + p.nbytes > limit:
            shards.append([])
            size = 0
        shards[-1].append(p)
        size += p.nbytes
    return shards


# --- writing ----------------------------------------------------------------------------------------
def export_hf(
    ckpt,
    out: str | os.PathLike,
    options: ConvertOptions,
    progress: Callable[[int], None] | None = None,
    planned=None,
) -> ConvertResult:
    """Write the folder ``out`` from ``ckpt``; returns what was written and how exactly.
    ``planned``: ``_prepare``'s result for these arguments, if already made."""
    out = Path(out)
    prep = planned or _prepare(ckpt, options)
    shards = _shards(prep.plans, _shard_bytes(prep.opts.max_shard_size))
    names = _shard_names(len(shards))
    files = [*names, *([INDEX_NAME] if len(shards) > 1 else []), *_side_file_names(ckpt)]
    meta = {
        "format": "pt",
        META_CONVERTER: f"matq {MATQ_VERSION}",
        "matq.source.digest": ckpt.digest,
        FILES_KEY: files_record(files),
    }
    inexact: list[str] = []
    with AtomicOutput(out, HF_FOLDER, inputs=ckpt.input_paths(), overwrite=options.overwrite) as o:
        weight_map = {}
        for fname, shard in zip(names, shards, strict=True):
            w = SafetensorsWriter(o.tmp / fname)
            try:
                for p in shard:
                    if not _write_tensor(w, ckpt, p, prep):
                        inexact.append(p.name)
                    weight_map.update(dict.fromkeys(p.entries, fname))
                    if progress:
                        progress(1)
            except BaseException:
                w.abort()
                raise
            w.close(meta)
        if len(shards) > 1:
            total = sum(p.nbytes for p in prep.plans)
            index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
            (o.tmp / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n")
        _write_side_files(ckpt, o.tmp, prep)
        o.commit()
    return _result(out, ckpt, prep, shards, inexact)


def _write_tensor(w: SafetensorsWriter, ckpt, p: _Plan, prep: _Prepared) -> bool:
    """One tensor's entries; returns whether they hold the slice (or the stored tensor) bit for bit."""
    if p.how == "copy":
        src, offset, nbytes = ckpt.dense_location(p.name)
        ckpt.check_copied(p.name, w.copy_from(p.name, src, offset, nbytes, *p.entries[p.name]))
        return True
    if p.how == "float":
        info = ckpt.info(p.name)
        if info.quantized:
            ep = prep.extra_precision and p.bits < ckpt.code_bits
            x = ckpt.dequantize(p.name, p.bits, ep)
        else:
            x = ckpt.dequantize(p.name)
        y = x.astype(dtypes.np_dtype(p.dtype))
        exact = bool(np.array_equal(y.astype(np.float32), x.astype(np.float32)))
        if prep.opts.exact and not exact:
            raise InexactError(
                ckpt.path, f"{p.name}: its values are not exact in {p.dtype} (--exact); try --dtype float32"
            )
        w.write(p.name, y, p.dtype)
        return exact
    if p.how == "gptq":
        _write_gptq(w, ckpt, p, prep)
        return True
    _write_packed(w, ckpt, p, prep)
    return True


def _write_gptq(w: SafetensorsWriter, ckpt, p: _Plan, prep: _Prepared) -> None:
    """GPTQ entries: codes and zero points packed in int32, float16 scales, g_idx."""
    ep = prep.extra_precision and p.bits < ckpt.code_bits
    k = ckpt.sliced_codes(p.name, p.bits, ep)
    arrays = hf_gptq.tensors(
        k,
        ckpt.scale(p.name),
        ckpt.zero(p.name),
        ckpt.code_bits,
        p.bits,
        ep,
        p.container,
        ckpt.info(p.name).group_size,
    )
    module = p.name.removesuffix(".weight")
    for suffix, array in arrays.items():
        name = f"{module}.{suffix}"
        w.write(name, array, p.entries[name][0])


def _write_packed(w: SafetensorsWriter, ckpt, p: _Plan, prep: _Prepared) -> None:
    """compressed-tensors entries: codes in the container, float32 scales, packed zero points."""
    c, code_bits = p.container, ckpt.code_bits
    ep = prep.extra_precision and p.bits < code_bits
    module = p.name.removesuffix(".weight")
    k = container_codes(ckpt.sliced_codes(p.name, p.bits, ep), code_bits, p.bits, ep, c)
    w.write(f"{module}.weight_packed", pack_int32(k, c), "I32")
    del k
    s, z = container_scale_zero(ckpt.scale(p.name), ckpt.zero(p.name), code_bits, p.bits, ep, c)
    w.write(f"{module}.weight_scale", s, "F32")
    w.write(f"{module}.weight_shape", np.asarray(ckpt.info(p.name).shape, np.int64), "I64")
    if not p.symmetric:
        zc = z.astype(np.uint16)
        w.write(f"{module}.weight_zero_point", np.ascontiguousarray(pack_int32(zc.T, c).T), "I32")


def pack_int32(values: np.ndarray, bits: int) -> np.ndarray:
    """compressed-tensors' ``pack_to_int32`` of unsigned codes along rows: element i of a row at bit
    ``i * bits`` of the row's little-endian bit stream, rows padded to 32 elements, int32 words."""
    rows, cols = values.shape
    words = math.ceil(cols * bits / 32)
    padded = math.ceil(cols / 32) * 32
    out = np.empty((rows, padded * bits // 32), np.uint32)
    step = max(1, PACK_BLOCK // max(padded, 1))
    for r0 in range(0, rows, step):
        v = np.zeros((min(step, rows - r0), padded), np.uint8)
        v[:, :cols] = values[r0 : r0 + step]
        out[r0 : r0 + step] = pack_bytes(v, bits).view("<u4")
    return np.ascontiguousarray(out[:, :words]).view(np.int32)


def _shard_names(n: int) -> list[str]:
    return [WEIGHTS_NAME] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]


def _side_file_names(ckpt) -> list[str]:
    """What :func:`_write_side_files` writes: the carried files and config.json."""
    return sorted({*ckpt.manifest.get("carried", {}), "config.json"})


def _write_side_files(ckpt, tmp: Path, prep: _Prepared) -> None:
    """The carried files (tokenizer, generation config...) and config.json with the layout's entries."""
    for rel, data in ckpt.carried_bytes().items():
        if rel == "config.json":
            continue
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)
    cfg = dict(prep.cfg)
    cfg.pop("quantization_config", None)
    if prep.opts.dtype:
        cfg["dtype"] = prep.opts.dtype
        cfg.pop("torch_dtype", None)
    if prep.gptq:
        cfg["quantization_config"] = prep.gptq
    if prep.groups:
        cfg["quantization_config"] = {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "config_groups": prep.groups,
            "ignore": prep.ignore,
            "kv_cache_scheme": None,
            "dequantize": True,
        }
    (tmp / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def _result(out: Path, ckpt, prep: _Prepared, shards, inexact: list[str]) -> ConvertResult:
    """The summary line and the ``--json`` details."""
    packed = [p for p in prep.plans if p.how in ("packed", "gptq")]
    quantized = [p for p in prep.plans if p.bits is not None]
    size = sum(f.stat().st_size for f in out.glob("*.safetensors"))
    details = {
        "layout": prep.opts.layout,
        "files": len(shards),
        "bytes": size,
        "widths": prep.widths,
        "containers": {p.name: p.container for p in packed},
        "dequantized": [p.name for p in quantized if p.how == "float"],
        "exact_tensors": len(quantized) - len([n for n in inexact if n in prep.widths]),
        "quantized_tensors": len(quantized),
        "quantized_bytes": sum(p.nbytes for p in quantized),
        "inexact": inexact,
    }
    summary = (
        f"{out}: {prep.opts.layout}, {len(prep.plans)} tensors in {len(shards)} file(s), {size} bytes; "
        f"{len(packed)} packed, {details['exact_tensors']}/{len(quantized)} quantized tensors bit-exact"
    )
    if prep.budget is not None:  # the figure the budget was checked against, not this folder's bytes
        bpw = summarize(ckpt, prep.widths, prep.extra_precision).bits_per_weight
        details["plan_bits_per_weight"] = bpw
        summary += f"; {prep.budget}: {bpw:.3f} bits per quantized weight as matq stores them"
    warnings = []
    if prep.opts.layout != "dense":
        by_why: dict[str, list[str]] = {}
        for p in quantized:
            if p.how == "float":
                by_why.setdefault(p.why or DENSE_OTHER, []).append(p.name)
        for why, names in by_why.items():
            more = f" and {len(names) - 3} more" if len(names) > 3 else ""
            named = ", ".join(names[:3])
            warnings.append(f"stored {len(names)} quantized tensor(s) dequantized ({why}): {named}{more}")
    return ConvertResult(out, summary, details, warnings)


class HFConverter(PlannedExporter):
    name = "hf"
    description = "Hugging Face folder: compressed-tensors (pack-quantized) or dense"
    suffix = ""
    Options = HFOptions

    plan = staticmethod(_prepare)
    export = staticmethod(export_hf)
