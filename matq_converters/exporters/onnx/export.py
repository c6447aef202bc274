"""ONNX export (``matq convert --to onnx``): a folder onnxruntime runs on the CPU, and for decoders
one onnxruntime-genai generates text with.

How: the checkpoint's slice is written as a float32 Hugging Face folder (``--to hf --layout
dense``), the float graph is made from it by the tool built for the job (``onnx_source``: the
onnxruntime-genai builder for decoders, ``torch.onnx.export`` for encoders), then every MatMul whose
weight is bit for bit a quantized slice is rebuilt from the slice's own codes (``onnx_graph``), never
re-quantized from floats. Layouts (``--layout``):

- ``matmulnbits`` (default): ``com.microsoft.MatMulNBits`` with 2-, 4- or 8-bit containers (3 bits
  in 4, 5-7 in 8, extra precision one container up), ``accuracy_level`` 1 (float32 compute: the
  output is the slice's, bit for bit in the weights); ``--accuracy int8`` sets 4 (int8 activations,
  faster, not exact).
- ``qdq``: standard ``DequantizeLinear`` (blocked, uint4/uint8 from opset 21, uint2 from 25) +
  ``MatMul``. onnxruntime fuses these into MatMulNBits and, unless the session option
  ``session.qdq_matmulnbits_accuracy_level`` is ``1``, quantizes activations to int8 on the way; the
  decoder's ``genai_config.json`` sets it, other callers must (README "Convert to ONNX").

Built in a temporary folder and published whole by ``AtomicOutput``.
"""

from __future__ import annotations

import json
import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass, field
from itertools import product
from pathlib import Path

import numpy as np

from matq_converters.exporters.onnx import graph as onnx_graph
from matq_converters.exporters.onnx import source as onnx_source
from matq_converters.exporters.onnx.options import ACCURACY, ONNXOptions
from matq_converters.exporters.onnx.weights import (
    WeightPlan,
    matmulnbits_inputs,
    moe_bits,
    plan_weight,
    qdq_inputs,
    qmoe_whole,
    stored_bits,
)
from matq_converters.registry import (
    ConvertOptionError,
    ConvertOptions,
    ConvertResult,
    PlannedExporter,
    UnsupportedModelError,
    typed_options,
)
from matq_format import __version__ as MATQ_VERSION
from matq_format import numerics
from matq_format import progress as steps
from matq_format.budget import (
    BUDGET_PREFIX,
    BudgetTooSmall,
    cheapest_within,
    parse_budget,
    slicing_errors,
    tied,
)
from matq_format.plans import resolve_plan
from matq_format.publish import FILES_KEY, AtomicOutput, OutputKind, files_record, read_files_record
from matq_format.safefs import allowed_roots, check_file, read_bounded

META_CONVERTER = "matq.converter"
MODEL_MAX_BYTES = 1 << 31
"""protobuf's limit: the graph, its weights kept in the external data file."""
QDQ_SESSION_KEY = "session.qdq_matmulnbits_accuracy_level"


class OpsetError(UnsupportedModelError):
    """The layout needs an ONNX opset the installed onnx package does not have."""


def _model_metadata(path: Path) -> dict[str, str] | None:
    """The metadata of the folder's model.onnx (a regular file inside it, read without its weights)."""
    try:
        import onnx

        model_file = check_file(path / "model.onnx", allowed_roots(path))
        model = onnx.load_model_from_string(read_bounded(model_file, MODEL_MAX_BYTES))
        return {p.key: p.value for p in model.metadata_props}
    except Exception:  # noqa: BLE001 - anything unreadable is not ours
        return None


def is_onnx_export(path: Path) -> bool:
    """Whether ``path`` is a folder this exporter wrote (its model.onnx names matq), for ``--force``."""
    return META_CONVERTER in (_model_metadata(path) or {})


def onnx_export_files(path: Path) -> list[str] | None:
    """The files an export recorded writing (model.onnx's ``matq.files``), for ``--force``."""
    return read_files_record(_model_metadata(path))


ONNX_FOLDER = OutputKind("ONNX folder", True, is_onnx_export, onnx_export_files)


@dataclass
class _Prepared:
    opts: ONNXOptions
    family: str
    widths: dict[str, int]
    ep: bool
    plans: dict[str, WeightPlan] = field(default_factory=dict)
    shapes: dict[str, tuple[int, ...]] = field(default_factory=dict)
    """The shape of each planned weight."""
    budget: str | None = None
    """The ``budget:BITS`` plan the widths were chosen for, if any."""


def _prepare(ckpt, options: ConvertOptions) -> _Prepared:
    """Check the request and plan every quantized weight before anything is written."""
    opts = typed_options(ONNXOptions, options.settings, "--to onnx")
    if (options.bits is None) == (options.plan is None):
        raise ConvertOptionError(ckpt.path, "give exactly one of bits or plan")
    if ckpt.config is None:
        raise UnsupportedModelError(ckpt.path, "has no carried config.json; the ONNX graph is built from it")
    fam = onnx_source.family(ckpt)
    spec = options.bits if options.plan is None else options.plan
    if isinstance(spec, str) and spec.startswith(BUDGET_PREFIX):
        widths = _budget_widths(ckpt, spec, options.extra_precision, opts)
    else:
        widths = resolve_plan(spec, ckpt, extra_precision=options.extra_precision)
    prep = _Prepared(opts, fam, widths, options.extra_precision)
    if isinstance(spec, str) and spec.startswith(BUDGET_PREFIX):
        prep.budget = spec
    for name, bits in widths.items():
        info = ckpt.info(name)
        if len(info.shape) == 2 or (info.stacked and len(info.shape) == 3):
            prep.shapes[name] = (info.rows, info.cols)
            ep = options.extra_precision and bits < ckpt.code_bits
            prep.plans[name] = p = plan_weight(ckpt, name, bits, ep, opts.layout, opts.exact)
            if opts.exact and not p.exact:
                raise ConvertOptionError(
                    ckpt.path, f"{name}: int{bits} is not exact in --layout {opts.layout}: {p.reason}"
                )
    _check_opset(ckpt, prep)
    return prep


def _budget_widths(ckpt, spec: str, ep: bool, opts: ONNXOptions) -> dict[str, int]:
    """``budget:BITS`` in the file's bits per quantized weight (codes, scales and zero points, as
    stored in this layout): a width per weight, for the least squared error to its full width
    (weighted by the kept importance: :class:`ErrorWeights`). The expert weights of one MoE node are
    one item whose options are their combinations of widths, each costing what the file holds:
    the node becomes QMoE only whole, else all its weights stay float (:func:`moe_bits`). Widths in
    the same container cost the same, so the search leaves the narrower one out. The sizes are
    counted first: a budget below the smallest file is refused before any weight is dequantized."""
    budget = parse_budget(spec)
    c = ckpt.code_bits
    names = ckpt.quantized_names()
    plans = {
        n: {r: plan_weight(ckpt, n, r, ep and r < c, opts.layout, opts.exact) for r in _widths(ckpt, n)}
        for n in names
    }
    items = tied(names, _moe_nodes(ckpt, names))
    cost = {g: _item_costs(ckpt, g, plans) for g in items}
    total = sum(ckpt.info(n).numel for n in names)
    least = sum(min(cost[g].values()) for g in items)
    try:
        if least > budget * total:
            raise BudgetTooSmall(least)
        err = _width_errors(ckpt, spec, plans, ep)
        summed = {g: {ws: sum(err[n][r] for n, r in zip(g, ws, strict=True)) for ws in cost[g]} for g in items}
        choice = cheapest_within(summed, cost, budget * total)
    except BudgetTooSmall as exc:
        least = exc.minimum / total
        raise ConvertOptionError(
            ckpt.path, f"{spec} is below the smallest this checkpoint makes ({least:.3f} bits per weight)"
        ) from None
    return {n: r for g, ws in choice.items() for n, r in zip(g, ws, strict=True)}


def _widths(ckpt, name: str) -> range:
    return range(2, ckpt.info(name).max_width(ckpt.code_bits) + 1)


def _width_errors(ckpt, spec: str, plans: dict, ep: bool) -> dict[str, dict[int, float]]:
    """Each weight's (importance-weighted) squared error at each planned width to its widest."""
    return slicing_errors(ckpt, {name: sorted(rs) for name, rs in plans.items()}, ep, spec)


def _moe_nodes(ckpt, names: list[str]) -> list[list[str]]:
    """The stacked expert weights of each module: what one MoE node of the builder's graph holds
    (gpt-oss's ``mlp.experts.gate_up_proj`` and ``down_proj``)."""
    nodes: dict[str, list[str]] = {}
    for n in names:
        if ckpt.info(n).stacked:
            nodes.setdefault(n.rsplit(".", 1)[0], []).append(n)
    return list(nodes.values())


def _item_costs(ckpt, group: tuple[str, ...], plans: dict) -> dict[tuple[int, ...], int]:
    """Bits of each combination of widths of ``group`` (one weight, or one MoE node's), as written."""
    shapes = [(ckpt.info(n).rows, ckpt.info(n).cols) for n in group]
    if len(group) == 1 and not ckpt.info(group[0]).stacked:
        return {(r,): stored_bits(p, shapes[0]) for r, p in plans[group[0]].items()}
    return {
        ws: moe_bits([plans[n][r] for n, r in zip(group, ws, strict=True)], shapes)
        for ws in product(*(plans[n] for n in group))
    }


def _check_opset(ckpt, prep: _Prepared) -> None:
    import onnx

    if prep.opts.layout != "qdq":
        return
    need = max((onnx_graph.QDQ_OPSET[p.container] for p in prep.plans.values() if p.container), default=0)
    have = onnx.defs.onnx_opset_version()
    if need > have:
        raise OpsetError(
            ckpt.path,
            f"--layout qdq at 2 bits needs ONNX opset {need} (uint2); the installed onnx {onnx.__version__} "
            f"has opset {have}: upgrade onnx or use --layout matmulnbits",
        )


def export_onnx(
    ckpt,
    out: str | os.PathLike,
    options: ConvertOptions,
    progress: Callable[[int], None] | None = None,
    planned=None,
) -> ConvertResult:
    """Write the folder ``out`` from ``ckpt``; returns what was written and how exactly.
    ``planned``: ``_prepare``'s result for these arguments, if already made. Its steps are reported
    through :mod:`matq_format.progress`; ``progress`` hears of every tensor at the end."""
    from matq_converters.exporters.hf.export import HFOptions, export_hf

    out = Path(out)
    prep = planned or _prepare(ckpt, options)
    with AtomicOutput(out, ONNX_FOLDER, inputs=ckpt.input_paths(), overwrite=options.overwrite) as o:
        work = o.tmp / ".matq-work"
        # the widths as planned here (a budget counts this layout's bytes, not the HF folder's)
        dense = ConvertOptions(None, prep.widths, prep.ep, False, HFOptions("dense", "float32"))
        n = len(ckpt.tensor_names())
        with steps.stage("onnx: the plan's weights as a float folder", n, "tensor") as advance:
            export_hf(ckpt, work / "hf", dense, advance)
        with steps.stage(f"onnx: the float {prep.family} graph (torch export)"):
            _build_float(ckpt, prep, work)
        with steps.stage("onnx: find each weight in the graph", n, "tensor") as advance:
            found = _slice_index(ckpt, prep, advance)
        targets = {i: onnx_graph.Part(n) for i, n in onnx_graph.find_slices(work / "float", found).items()}
        targets.update(_row_blocks(ckpt, prep, work / "float", targets))
        targets = _whole_moe_nodes(prep, work / "float", targets)
        files = ["model.onnx", onnx_graph.DATA_NAME, *_side_file_names(ckpt, prep, work)]
        with steps.stage("onnx: write the quantized graph"):
            done = onnx_graph.rewrite(
                work / "float", o.tmp, targets, lambda n: _encode(ckpt, prep, n), _metadata(ckpt, prep, files)
            )
        if progress:
            progress(n)
        _side_files(ckpt, prep, work, o.tmp)
        shutil.rmtree(work)
        o.commit()
    return _result(out, prep, done)


def _build_float(ckpt, prep: _Prepared, work: Path) -> None:
    if prep.family == "decoder":
        arch = (ckpt.config.get("architectures") or ["?"])[0]
        onnx_source.build_decoder(work / "hf", work / "float", work / "builder.log", ckpt.path, arch)
    else:
        onnx_source.build_encoder(work / "hf", work / "float")


def _slice_index(ckpt, prep: _Prepared, progress) -> dict[str, str]:
    """Digest of each planned weight's transposed slice -> its name (one tensor in memory at a time)."""
    index = {}
    for name in ckpt.tensor_names():
        p = prep.plans.get(name)
        if p is not None:
            w = ckpt.dequantize(name, p.bits, p.ep)
            w = np.moveaxis(w, ckpt.info(name).in_axis, -1) if w.ndim == 3 else w.T  # as the graph holds it
            index.setdefault(onnx_graph.digest(w), name)
        if progress:
            progress(1)
    return index


def _whole_moe_nodes(prep: _Prepared, folder: Path, targets: dict) -> dict:
    """Expert weights only of MoE nodes that become QMoE whole (:func:`qmoe_whole`); other nodes stay
    float."""
    import onnx

    model = onnx.load(folder / "model.onnx", load_external_data=False)
    drop = set()
    for weights in onnx_graph.moe_weights(model).values():
        if not qmoe_whole([prep.plans[targets[w].tensor] if w in targets else None for w in weights]):
            drop.update(weights)
    return {i: p for i, p in targets.items() if i not in drop}


def _row_blocks(ckpt, prep: _Prepared, folder: Path, found: dict[str, onnx_graph.Part]) -> dict:
    """The planned weights no initializer equals whole, found as blocks of rows (a fused Q/K/V or
    gate/up weight the graph's producer split); only those tensors' rows are indexed."""
    held = {p.tensor for p in found.values()}
    missing = [n for n in prep.plans if n not in held and not ckpt.info(n).stacked]
    if not missing:
        return {}
    first_rows: dict[str, list[tuple[str, int]]] = {}
    for name in missing:
        w = _slice(ckpt, prep, name)
        for i in range(w.shape[0]):
            first_rows.setdefault(onnx_graph.digest(w[i]), []).append((name, i))
    return onnx_graph.find_row_blocks(folder, set(found), first_rows, lambda n: _slice(ckpt, prep, n))


def _slice(ckpt, prep: _Prepared, name: str) -> np.ndarray:
    p = prep.plans[name]
    return ckpt.dequantize(name, p.bits, p.ep)


def _encode(ckpt, prep: _Prepared, part: onnx_graph.Part) -> onnx_graph.Encoded | None:
    """One weight's initializers (or a block of its rows'), from its codes, scales and zero points."""
    name = part.tensor
    p = prep.plans[name]
    if p.container is None:
        return None
    k = ckpt.sliced_codes(name, p.bits, p.ep)
    s, z, g = ckpt.scale(name), ckpt.zero(name), ckpt.info(name).group_size
    if part.rows is not None:
        a, b = part.rows
        k, s, z = k[a:b], s[a:b], z[a:b]
    stack = None
    if k.ndim == 3:  # experts: their matrix view [experts*out, in], reshaped to QMoE's [experts, out, ...]
        axis = ckpt.info(name).in_axis
        stack = (k.shape[0], k.shape[3 - axis])
        k, s, z = (numerics.as_matrix(x, axis) for x in (k, s, z))
    if prep.opts.layout == "matmulnbits":
        arrays = matmulnbits_inputs(p, k, s, z, ckpt.code_bits, g)
    else:
        arrays = qdq_inputs(p, k, s, z, ckpt.code_bits)
    return onnx_graph.Encoded(p, arrays, tuple(k.shape), prep.opts.layout, ACCURACY[prep.opts.accuracy], stack)


def _metadata(ckpt, prep: _Prepared, files: list[str]) -> dict[str, str]:
    return {
        FILES_KEY: files_record(files),
        META_CONVERTER: f"matq {MATQ_VERSION}",
        "matq.source.digest": ckpt.digest,
        "matq.layout": prep.opts.layout,
        "matq.widths": json.dumps(prep.widths, sort_keys=True),
        "matq.extra_precision": str(bool(prep.ep)).lower(),
    }


def _side_file_names(ckpt, prep: _Prepared, work: Path) -> list[str]:
    """What :func:`_side_files` writes."""
    if prep.family == "decoder":
        skip = ("model.onnx", onnx_graph.DATA_NAME)
        return sorted(f.name for f in (work / "float").iterdir() if f.is_file() and f.name not in skip)
    return sorted(ckpt.manifest.get("carried", {}))


def _side_files(ckpt, prep: _Prepared, work: Path, tmp: Path) -> None:
    """genai_config.json and tokenizer files (decoders, from the builder), or the carried files."""
    if prep.family == "decoder":
        for f in (work / "float").iterdir():
            if f.is_file() and f.name not in ("model.onnx", onnx_graph.DATA_NAME):
                shutil.copy(f, tmp / f.name)
        if prep.opts.layout == "qdq":
            onnx_source.set_session_option(
                tmp / "genai_config.json", QDQ_SESSION_KEY, str(ACCURACY[prep.opts.accuracy])
            )
        return
    for rel, data in ckpt.carried_bytes().items():
        (tmp / rel).parent.mkdir(parents=True, exist_ok=True)
        (tmp / rel).write_bytes(data)


def _covered(prep: _Prepared, parts) -> set[str]:
    """The tensors whose every row the replaced initializers hold."""
    rows: dict[str, set[int]] = {}
    for part in parts:
        start, stop = part.rows or (0, prep.shapes[part.tensor][0])
        rows.setdefault(part.tensor, set()).update(range(start, stop))
    return {n for n, r in rows.items() if len(r) == prep.shapes[n][0]}


def _result(out: Path, prep: _Prepared, done: onnx_graph.Rewrite) -> ConvertResult:
    quantized = _covered(prep, done.replaced.values())
    floats = {
        n: p.reason or "not a MatMul weight in the graph, or its MoE node's other weights stay float"
        for n, p in sorted(prep.plans.items())
        if n not in quantized
    }
    inexact = sorted(n for n in quantized if not prep.plans[n].exact)
    size = sum(f.stat().st_size for f in out.iterdir() if f.name.startswith("model.onnx"))
    containers = {n: prep.plans[n].container for n in sorted(quantized)}
    details = {
        "layout": prep.opts.layout,
        "family": prep.family,
        "bytes": size,
        "widths": prep.widths,
        "containers": containers,
        "float_weights": floats,
        "float_zero_points": inexact,
        "opset": done.opset or None,
    }
    numel = sum(rows * cols for rows, cols in prep.shapes.values())
    stored = sum(_written_bits(prep, n, n in quantized) for n in prep.shapes)
    details["bits_per_quantized_weight"] = bpw = stored / numel if numel else 0.0
    summary = (
        f"{out}: {prep.opts.layout}, {len(quantized)} quantized MatMuls "
        f"({len(quantized) - len(inexact)} with weights bit-exact), {prep.opts.accuracy} compute, {size} bytes; "
        f"{bpw:.3f} bits per quantized weight (codes, scales, zero points as stored"
        + (f", as {prep.budget} counts them)" if prep.budget else ")")
    )
    warnings = []
    if floats:
        more = f" and {len(floats) - 3} more" if len(floats) > 3 else ""
        named = "; ".join(f"{n} ({why})" for n, why in list(floats.items())[:3])
        warnings.append(f"{len(floats)} quantized tensor(s) stay float: {named}{more}")
    if prep.opts.layout == "qdq" and prep.family == "encoder":
        warnings.append(
            f"onnxruntime quantizes the activations of QDQ MatMuls to int8 unless the session sets "
            f"{QDQ_SESSION_KEY}={ACCURACY[prep.opts.accuracy]} (there is no genai_config.json to carry it)"
        )
    return ConvertResult(out, summary, details, warnings)


def _written_bits(prep: _Prepared, name: str, quantized: bool) -> int:
    """Bits a planned weight takes in the folder: as planned if its initializers were replaced, else
    32 per weight (a float MatMul, or an expert of a MoE node that stayed float)."""
    rows, cols = prep.shapes[name]
    return stored_bits(prep.plans[name], (rows, cols)) if quantized else 32 * rows * cols


class ONNXConverter(PlannedExporter):
    name = "onnx"
    description = "ONNX folder for onnxruntime (MatMulNBits or QDQ) and onnxruntime-genai"
    suffix = ""
    Options = ONNXOptions

    plan = staticmethod(_prepare)
    export = staticmethod(export_onnx)
