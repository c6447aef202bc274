"""GGUF export: a matq checkpoint at one width, or a Mix'n'Match plan, as a file llama.cpp runs.

Quantized tensors keep their MatQuant grid: the sliced integer codes become the levels of the
smallest ggml type that holds the grid (``gguf_blocks``), so nothing is re-quantized through
float. Everything else comes from llama.cpp's own converter (``view``), run over a float view of the
checkpoint: tensor names, hyper-parameters, vocabulary and transforms; each tensor it would write
from quantized sources is matched row by row to their slices (``match``) and written as their codes.
Unquantized tensors are written at ``outtype``. The file goes through the converter's
``gguf.GGUFWriter`` into a temporary file next to the output, renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from matq_converters import hfconfig
from matq_converters.exporters.gguf import view
from matq_converters.exporters.gguf.options import GGUFOptions
from matq_converters.registry import (
    ConvertOptionError,
    ConvertOptions,
    ConvertResult,
    PlannedExporter,
    UnsupportedModelError,
    typed_options,
)
from matq_format import __version__ as MATQ_VERSION
from matq_format import numerics as N
from matq_format.budget import BUDGET_PREFIX, parse_budget
from matq_format.errors import MatqError
from matq_format.plans import resolve_plan
from matq_format.publish import AtomicOutput, OutputKind
from matq_format.safefs import open_regular

# matq.* keys, beside llama.cpp's general.* keys: where the file came from and what it holds
KEY_FORMAT_VERSION = "matq.format_version"
KEY_SOURCE_DIGEST = "matq.source.digest"
KEY_SOURCE = "matq.source"
KEY_CODE_BITS = "matq.code_bits"
KEY_BITS = "matq.bits"
KEY_PLAN = "matq.plan"
KEY_WIDTHS = "matq.widths"
KEY_EXTRA_PRECISION = "matq.extra_precision"
KEY_EXACT = "matq.exact"
KEY_EXACT_TENSORS = "matq.exact_tensors"
KEY_QUANTIZED_TENSORS = "matq.quantized_tensors"
KEY_CONVERTER = "matq.converter"
KEY_REFIT = "matq.refit_rel_rms"
"""JSON {tensor: relative RMS error against its slice} of the tensors not stored exactly."""

_FILE_TYPES = {
    "F32": "ALL_F32",
    "F16": "MOSTLY_F16",
    "BF16": "MOSTLY_BF16",
    "Q4_0": "MOSTLY_Q4_0",
    "Q4_1": "MOSTLY_Q4_1",
    "Q5_0": "MOSTLY_Q5_0",
    "Q5_1": "MOSTLY_Q5_1",
    "Q8_0": "MOSTLY_Q8_0",
    "Q2_0": "MOSTLY_Q2_0",
    "Q2_K": "MOSTLY_Q2_K",
    "Q3_K": "MOSTLY_Q3_K_S",
    "Q4_K": "MOSTLY_Q4_K_S",
    "Q5_K": "MOSTLY_Q5_K_S",
    "Q6_K": "MOSTLY_Q6_K",
}


def is_gguf(path: Path) -> bool:
    """Whether ``path`` is a GGUF file (its magic), so ``--force`` replaces only such a file."""
    try:
        with open_regular(path) as f:
            return f.read(4) == b"GGUF"
    except (OSError, MatqError):
        return False


GGUF_FILE = OutputKind("GGUF file", False, is_gguf)


@dataclass
class _Prepared:
    """A checked request: what :func:`export_gguf` writes. It holds no path to the carried files (the
    folder they were checked in is gone), so it stays valid until the export reads its own copy."""

    arch: str
    outputs: list[view.Output]
    widths: dict[str, int]
    """Checkpoint tensor -> width, of the quantized tensors."""
    allowed: tuple | None
    opts: GGUFOptions
    model_name: str
    vocab: view.Vocab
    """The vocabulary's keys, built by llama.cpp's converter once, when planning."""

    def quantized(self, o: view.Output) -> bool:
        return bool(o.sources) and o.sources[0] in self.widths

    @property
    def gguf_widths(self) -> dict[str, int]:
        """GGUF tensor name -> width, of the tensors written from quantized ones."""
        return {o.name: self.widths[o.sources[0]] for o in self.outputs if self.quantized(o)}


def plan_gguf(ckpt, options: ConvertOptions) -> _Prepared:
    """Check and plan the request (a ``budget:`` searches every width of every tensor), with the
    carried files checked in a temporary folder that is removed before the plan is returned."""
    with ckpt.carried_folder() as root:
        return _prepare(ckpt, options, root)


def _prepare(ckpt, options: ConvertOptions, root: Path) -> _Prepared:
    """Everything that can fail, checked before a byte is written (``root``: the checked carried files);
    llama.cpp's converter plans the file, reading no weights."""
    if (options.bits is None) == (options.plan is None):
        raise ConvertOptionError(ckpt.path, "give exactly one of bits or plan")
    opts = typed_options(GGUFOptions, options.settings, "--to gguf")
    allowed = _allowed_types(opts.types)
    cfg = ckpt.config
    if not cfg:
        raise UnsupportedModelError(ckpt.path, "has no config.json; GGUF export needs the source model's config")
    budget = _file_budget(options.plan, opts)
    if budget is None:
        spec = options.bits if options.plan is None else options.plan
        widths = resolve_plan(spec, ckpt, extra_precision=options.extra_precision)
    names = ckpt.tensor_names()  # config values that size work, bounded by the tensors present
    hfconfig.check(cfg, ((n, ckpt.info(n).shape) for n in names), ckpt.root / "config.json", UnsupportedModelError)
    name = str(ckpt.source.get("model") or cfg.get("_name_or_path") or ckpt.root.name)
    arch, outputs, vocab = view.plan(ckpt, root, name, opts.tokenizer_pre)
    _check_outputs(ckpt, outputs)
    if budget is not None:
        widths = _budget_widths(ckpt, outputs, budget, options.extra_precision, opts, name, root)
    widths = {n: widths[n] for n in ckpt.quantized_names()}
    _check_shared_widths(ckpt, outputs, widths)
    return _Prepared(arch, outputs, widths, allowed, opts, name, vocab)


def _check_outputs(ckpt, outputs: list[view.Output]) -> None:
    """A GGUF tensor is computed from quantized tensors only, or from unquantized ones only."""
    for o in outputs:
        kinds = {ckpt.info(s).quantized for s in o.sources}
        if len(kinds) > 1:
            raise UnsupportedModelError(
                ckpt.path, f"GGUF tensor {o.name} mixes quantized and unquantized tensors: {', '.join(o.sources)}"
            )
        if len({ckpt.info(s).group_size for s in o.sources}) > 1:
            raise UnsupportedModelError(
                ckpt.path, f"GGUF tensor {o.name} stacks tensors of different group sizes: {', '.join(o.sources)}"
            )
        if True in kinds and len(o.shape) < 2:
            raise UnsupportedModelError(ckpt.path, f"GGUF tensor {o.name} from {o.sources[0]} is not a matrix")


def _check_shared_widths(ckpt, outputs: list[view.Output], widths: dict[str, int]) -> None:
    """Tensors stacked into one GGUF tensor (experts, fused projections) share one block type."""
    for o in outputs:
        got = {widths[s] for s in o.sources if s in widths}
        if len(got) > 1:
            raise ConvertOptionError(
                ckpt.path, f"{', '.join(o.sources)} are one GGUF tensor {o.name}; give them one width"
            )


def _budget_widths(
    ckpt, outputs: list[view.Output], budget: float, ep: bool, opts: GGUFOptions, name: str, root: Path
) -> dict[str, int]:
    """Widths for a file of at most ``budget`` bits per weight, every tensor counted as written (a
    tensor that feeds several, each by the rows it gives it: :func:`view.row_maps`)."""
    from matq_converters.exporters.gguf.budget import Part, file_budget_plan

    dense = tuple(
        (o.name, dense_bits(ckpt, o, opts.outtype, 6), int(np.prod(o.shape)))
        for o in outputs
        if not any(ckpt.info(s).quantized for s in o.sources)
    )
    quantized = [o for o in outputs if any(ckpt.info(s).quantized for s in o.sources)]
    partial = {o.name: o.sources for o in quantized if _rows(o) < sum(ckpt.info(s).rows for s in o.sources)}
    for gguf_name, sources in partial.items():
        if len(sources) > 1:
            raise UnsupportedModelError(
                ckpt.path,
                f"GGUF tensor {gguf_name} holds some rows of each of {', '.join(sources)}; a budget cannot cost it",
            )
    maps = view.row_maps(ckpt, root, {n: s[0] for n, s in partial.items()}, name) if partial else {}
    return file_budget_plan(ckpt, [Part(o.sources, maps.get(o.name)) for o in quantized], dense, budget, ep)


def _rows(o: view.Output) -> int:
    """Rows of a GGUF tensor (every element but its last axis, the input features)."""
    return int(np.prod(o.shape[:-1]))


def _file_budget(plan, opts: GGUFOptions) -> float | None:
    """``budget:BITS`` counts the file's bits per weight here (every tensor, as llama.cpp reports them)."""
    if not (isinstance(plan, str) and plan.startswith(BUDGET_PREFIX)):
        return None
    budget = parse_budget(plan)
    if opts.exact or opts.float_slices or opts.types:
        raise ConvertOptionError(None, f"{plan} chooses compact types itself; it cannot be combined with exact")
    return budget


def dense_type(o: view.Output, outtype: str, width: int):
    """The block type of an unquantized tensor, or None to store it as floats (see :func:`float_type`)."""
    from gguf import GGMLQuantizationType as T

    from matq_converters.exporters.gguf import blocks as B

    if o.keep_float or len(o.shape) != 2 or outtype not in ("auto", "q8_0"):
        return None
    cols = o.shape[-1]
    if cols % 32:
        return None
    return T.Q8_0 if outtype == "q8_0" or width >= 7 or cols % B.QK_K else T.Q6_K


def float_type(ckpt, o: view.Output, outtype: str):
    """The float type of an unquantized tensor: F32 where llama.cpp keeps floats, else ``outtype``
    (``source``: as its sources are stored)."""
    from gguf import GGMLQuantizationType as T

    if o.keep_float or outtype == "f32":
        return T.F32
    if outtype in ("f16", "bf16"):
        return T[outtype.upper()]
    stored = {ckpt.info(s).dtype for s in o.sources}
    return T.F16 if stored == {"F16"} else T.BF16 if stored == {"BF16"} else T.F32


def dense_bits(ckpt, o: view.Output, outtype: str, width: int) -> float:
    """Bits an unquantized tensor takes in the file."""
    from matq_converters.exporters.gguf import blocks as B

    qtype = dense_type(o, outtype, width) or float_type(ckpt, o, outtype)
    return B.bits_per_weight(qtype) * int(np.prod(o.shape))


def _allowed_types(names) -> tuple | None:
    """Restrict the block types tried (tests and benchmarks); F32 always remains."""
    if names is None:
        return None
    from gguf import GGMLQuantizationType as T

    from matq_converters.exporters.gguf.blocks import ORDER

    try:
        types = tuple(T[str(n).upper()] for n in names)
    except KeyError as exc:
        raise ConvertOptionError(
            None, f"unknown GGUF type {exc}; known: {', '.join(t.name for t in ORDER)}"
        ) from None
    bad = [t.name for t in types if t not in ORDER]
    if bad:
        raise ConvertOptionError(None, f"matq does not write {', '.join(bad)}")
    return types


def export_gguf(
    ckpt,
    out: str | os.PathLike,
    options: ConvertOptions,
    progress: Callable[[int], None] | None = None,
    planned: _Prepared | None = None,
) -> ConvertResult:
    """Write ``out`` (a .gguf file) from ``ckpt``; returns what was written and how exactly.
    ``planned``: :func:`plan_gguf`'s result for these arguments, if already made."""
    import gguf

    out = Path(out)
    with (
        AtomicOutput(out, GGUF_FILE, inputs=ckpt.input_paths(), overwrite=options.overwrite) as o,
        ckpt.carried_folder() as root,
    ):
        prep = _prepare(ckpt, options, root) if planned is None else planned
        enc = _Encoder(ckpt, prep, options, progress)
        with view.run(ckpt, root, o.tmp, enc.load, enc.encode, prep.model_name, prep.vocab) as m:
            _add_matq_keys(m.gguf_writer, ckpt, prep, options, enc.tally)
            view.write(m, enc.tally.file_type(), ckpt.path)
            kv = m.gguf_writer.kv_data[0]
        o.commit()
    details = enc.tally.details(prep)
    details.update(
        tokenizer=kv[gguf.Keys.Tokenizer.MODEL].value,
        tokenizer_pre=kv[gguf.Keys.Tokenizer.PRE].value if gguf.Keys.Tokenizer.PRE in kv else None,
        bytes=out.stat().st_size,
    )
    return ConvertResult(out, _summary(out, details), details, [])


def _summary(out: Path, details: dict) -> str:
    """One line: architecture, tensors by type, how many are bit-exact, bits per quantized weight and
    per weight of the whole file (what a ``budget:`` is checked against, as llama.cpp counts it)."""
    counts = Counter(details["types"].values())
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return (
        f"{out}: {details['arch']}, {len(details['types'])} tensors ({kinds}); "
        f"{details['exact_tensors']}/{details['quantized_tensors']} quantized tensors bit-exact; "
        f"{details['bits_per_weight']:.3f} bits per quantized weight, "
        f"{details['file_bits_per_weight']:.3f} per weight of the file"
    )


class GGUFConverter(PlannedExporter):
    name = "gguf"
    description = "GGUF for llama.cpp; sliced grids kept exactly"
    suffix = ".gguf"
    Options = GGUFOptions

    plan = staticmethod(plan_gguf)
    export = staticmethod(export_gguf)


@dataclass
class _Tally:
    """What was written, counted tensor by tensor: types, sizes, and how many slices are exact."""

    types: dict[str, str] = field(default_factory=dict)
    weights_by_type: Counter = field(default_factory=Counter)
    n_bytes: int = 0
    n_weights: int = 0
    q_bits: int = 0
    q_weights: int = 0
    exact: int = 0
    quantized: int = 0
    refit: dict[str, float] = field(default_factory=dict)
    """GGUF name -> relative RMS error against its slice, of the slices not stored exactly."""

    def add(self, name: str, qtype, data, x: np.ndarray) -> None:
        self.n_bytes += int(np.asarray(data).nbytes)
        self.n_weights += x.size
        self.types[name] = qtype.name
        if x.ndim >= 2:
            self.weights_by_type[qtype.name] += x.size

    def file_type(self):
        """llama.cpp's file type: that of most weights in matrices."""
        import gguf

        if not self.weights_by_type:
            return gguf.LlamaFileType.ALL_F32
        return gguf.LlamaFileType[_FILE_TYPES[self.weights_by_type.most_common(1)[0][0]]]

    def details(self, prep: _Prepared) -> dict:
        return {
            "arch": prep.arch,
            "types": self.types,
            "widths": prep.gguf_widths,
            "sources": {o.name: list(o.sources) for o in prep.outputs if o.sources},
            "exact_tensors": self.exact,
            "quantized_tensors": self.quantized,
            "bits_per_weight": self.q_bits / self.q_weights if self.q_weights else 0.0,
            "file_bits_per_weight": 8 * self.n_bytes / self.n_weights if self.n_weights else 0.0,
            "refit_rel_rms": self.refit,
        }


class _Encoder:
    """Serves the converter the checkpoint's tensors (slices dequantized) and encodes what it writes:
    tensors from quantized sources as those sources' codes, the others at the output type."""

    def __init__(self, ckpt, prep: _Prepared, options: ConvertOptions, progress):
        self.ckpt, self.prep, self.progress = ckpt, prep, progress
        self.tally = _Tally()
        self.extra_precision = bool(options.extra_precision)
        self.outputs = {o.name: o for o in prep.outputs}
        self.slices: dict[str, tuple] = {}
        """Quantized sources served and not yet written: name -> (Slice, its floats), in rows along
        the input axis (a stack of matrices as one matrix: ``numerics.as_matrix``)."""
        self.uses = Counter(s for o in prep.outputs for s in o.sources)
        """Outputs each source is still to be written in (gpt-oss's gate_up_proj makes two)."""
        self.width = options.bits or (8 if min(prep.widths.values(), default=ckpt.code_bits) >= 7 else 6)
        exact_source = prep.opts.outtype == "auto" and prep.opts.exact
        self.outtype = "source" if exact_source else prep.opts.outtype

    def load(self, name: str) -> np.ndarray:
        if name not in self.prep.widths:
            return self.ckpt.dequantize(name)
        sl, rows = self._served(name)
        t = self.ckpt.info(name)
        x = N.from_matrix(rows, t.shape, t.in_axis)
        # a copy: the converter's own use cannot change it
        self.slices[name] = (sl, rows.copy() if np.shares_memory(x, rows) else rows)
        return x

    def _served(self, name: str) -> tuple:
        from matq_converters.exporters.gguf import blocks as B

        r = self.prep.widths[name]
        sl = B.checkpoint_slice(self.ckpt, name, r, self.extra_precision and r < self.ckpt.code_bits)
        return sl, sl.dequantize()

    def _part(self, name: str) -> tuple:
        """A source's slice and floats, kept until the last output computed from it is written."""
        self.uses[name] -= 1
        part = self.slices.get(name) or self._served(name)
        if self.uses[name] <= 0:
            self.slices.pop(name, None)
        return part

    def encode(self, name: str, x: np.ndarray, sources: tuple[str, ...]):
        o = self.outputs.get(name) or view.Output(name, x.shape, sources, False)
        sources = o.sources  # the plan's: once a tensor shared by two outputs (gpt-oss's gate_up_proj)
        # is computed for the first, the second's lazy graph no longer reaches the checkpoint
        if sources and sources[0] in self.prep.widths:
            qtype, data = self._quantized(name, x, sources)
        else:
            qtype, data = self._dense(o, x)
        self.tally.add(name, qtype, data, x)
        if self.progress:
            self.progress(len(sources))
        return qtype, data

    def _quantized(self, name: str, x: np.ndarray, sources: tuple[str, ...]):
        """The sources' codes in the converter's row order, encoded as asked (compact by default)."""
        from matq_converters.exporters.gguf import blocks as B
        from matq_converters.exporters.gguf.match import rows_of

        parts = [self._part(s) for s in sources]
        cols = x.shape[-1]
        floats = np.concatenate([f.reshape(-1, cols) for _, f in parts]) if len(parts) > 1 else parts[0][1]
        idx = rows_of(np.ascontiguousarray(x.reshape(-1, cols), np.float32), floats)
        if idx is None:
            raise UnsupportedModelError(
                self.ckpt.path,
                f"llama.cpp's converter writes {name} from {', '.join(sources)} other than by reordering "
                "their rows; their grid cannot be kept",
            )
        sl = B.stack([p for p, _ in parts], idx)
        enc = self._encoded(sl)
        if not enc.exact:  # the slice's floats, already in hand: sl.dequantize() bit for bit
            self.tally.refit[name] = B.rel_rms_error(enc, floats[idx])
        self.tally.quantized += 1
        self.tally.exact += enc.exact
        self.tally.q_bits += enc.data.nbytes * 8
        self.tally.q_weights += sl.k.size
        return enc.qtype, enc.data.reshape(*x.shape[:-1], -1)

    def _encoded(self, sl):
        from matq_converters.exporters.gguf import blocks as B

        opts = self.prep.opts
        if opts.float_slices is not None:
            return _float_slice(sl, opts.float_slices)
        if opts.exact or self.prep.allowed is not None:
            return B.encode(sl, self.prep.allowed)
        return B.encode_compact(sl)

    def _dense(self, o: view.Output, x: np.ndarray):
        """An unquantized tensor: a block type (``auto``: Q8_0 for int8 files, else Q6_K where rows are
        multiples of 256, else Q8_0), or floats (:func:`float_type`)."""
        import gguf
        from gguf import GGMLQuantizationType as T

        from matq_converters.exporters.gguf import blocks as B

        qtype = dense_type(o, self.outtype, self.width)
        if qtype is not None:
            enc = B.refit(np.ascontiguousarray(x, np.float32), qtype)
            return enc.qtype, enc.data
        ft = float_type(self.ckpt, o, self.outtype)
        if ft == T.BF16:
            return ft, gguf.quants.quantize(np.asarray(x, np.float32), T.BF16)
        return ft, np.ascontiguousarray(x, np.float32 if ft == T.F32 else np.float16)


def _add_matq_keys(w, ckpt, prep: _Prepared, options: ConvertOptions, tally: _Tally) -> None:
    """The ``matq.*`` keys: where the file came from, the widths it holds, and how exactly."""
    w.add_string(KEY_CONVERTER, f"matq {MATQ_VERSION}")
    w.add_string(KEY_FORMAT_VERSION, str(ckpt.version))
    w.add_string(KEY_SOURCE_DIGEST, ckpt.digest)
    if ckpt.source:
        w.add_string(KEY_SOURCE, json.dumps(ckpt.source, sort_keys=True))
    w.add_uint32(KEY_CODE_BITS, ckpt.code_bits)
    if options.plan is None:
        w.add_uint32(KEY_BITS, int(options.bits))
        plan = str(options.bits)
    else:
        plan = options.plan if isinstance(options.plan, str) else "custom"
    w.add_string(KEY_PLAN, plan)
    w.add_string(KEY_WIDTHS, json.dumps(prep.gguf_widths, sort_keys=True))
    w.add_bool(KEY_EXTRA_PRECISION, bool(options.extra_precision))
    w.add_bool(KEY_EXACT, tally.exact == tally.quantized)
    w.add_uint32(KEY_EXACT_TENSORS, tally.exact)
    w.add_uint32(KEY_QUANTIZED_TENSORS, tally.quantized)
    if tally.refit:
        w.add_string(KEY_REFIT, json.dumps(tally.refit, sort_keys=True))


def _float_slice(sl, outtype: str):
    """A slice dequantized and stored as floats (f16/bf16 round it, as llama.cpp's converter would)."""
    import gguf
    from gguf import GGMLQuantizationType as T

    from matq_converters.exporters.gguf.blocks import Encoded

    w = sl.dequantize()
    qtype = {"f32": T.F32, "f16": T.F16, "bf16": T.BF16}[outtype]
    data = (
        w if qtype == T.F32 else w.astype(np.float16) if qtype == T.F16 else gguf.quants.quantize(w, T.BF16)
    )
    back = gguf.quants.dequantize(data, qtype) if qtype == T.BF16 else data.astype(np.float32)
    return Encoded(qtype, data, bool(np.array_equal(back, w)))
