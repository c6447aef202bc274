"""GGUF export: a matq checkpoint at one width, or a Mix'n'Match plan, as a file llama.cpp runs.

Quantized tensors keep their MatQuant grid: the sliced integer codes become the levels of the
smallest ggml type that holds the grid (``gguf_blocks``), so nothing is re-quantized through
float. Unquantized tensors are written at ``outtype``; architecture quirks and the tokenizer come
from ``gguf_arch`` and ``gguf_vocab``. Everything goes through ``gguf.GGUFWriter`` into a temporary
file next to the output, renamed into place only when complete.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from matq_converters.exporters.gguf import arch as gguf_arch
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
from matq_format.budget import BUDGET_PREFIX, parse_budget
from matq_format.errors import MatqError
from matq_format.plans import resolve_plan
from matq_format.publish import AtomicOutput, OutputKind
from matq_format.safefs import open_regular

NO_QUANT = ("position_embd.weight", "token_types.weight")
"""Tensors llama.cpp never quantizes (BERT's position and token-type embeddings)."""

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
class _Tensor:
    hf_name: str
    gguf_name: str
    quantized: bool
    bits: int | None = None
    extra_precision: bool = False
    perm: np.ndarray | None = None
    offset: float = 0.0


@dataclass
class _Prepared:
    """A checked request: what :func:`export_gguf` writes. It holds no path to the carried files (the
    folder they were checked in is gone), so it stays valid until the export reads its own copy."""

    arch: gguf_arch.Arch
    cfg: dict
    tensors: list[_Tensor]
    widths: dict[str, int]
    n_vocab: int
    allowed: tuple | None
    opts: GGUFOptions

    @property
    def gguf_widths(self) -> dict[str, int]:
        """GGUF tensor name -> width, of the quantized tensors."""
        return {t.gguf_name: t.bits for t in self.tensors if t.quantized}


def plan_gguf(ckpt, options: ConvertOptions) -> _Prepared:
    """Check and plan the request (a ``budget:`` searches every width of every tensor), with the
    carried files checked in a temporary folder that is removed before the plan is returned."""
    with ckpt.carried_folder() as root:
        return _prepare(ckpt, options, root)


def _prepare(ckpt, options: ConvertOptions, root: Path) -> _Prepared:
    """Everything that can fail, checked before a byte is written (``root``: the checked carried files)."""
    if (options.bits is None) == (options.plan is None):
        raise ConvertOptionError(ckpt.path, "give exactly one of bits or plan")
    opts = typed_options(GGUFOptions, options.settings, "--to gguf")
    allowed = _allowed_types(opts.types)
    cfg = ckpt.config
    arch = gguf_arch.detect(cfg, ckpt.path)
    budget = _file_budget(options.plan, opts)
    if budget is None:
        spec = options.bits if options.plan is None else options.plan
        widths = resolve_plan(spec, ckpt, extra_precision=options.extra_precision)
    if arch.name == "gemma2" and cfg.get("tie_word_embeddings") is False:
        raise UnsupportedModelError(
            ckpt.path, "llama.cpp's gemma2 reuses the token embedding as lm_head; untied is unsupported"
        )
    tensors = _map_tensors(ckpt, arch, cfg)
    embd = next((t.hf_name for t in tensors if t.gguf_name == "token_embd.weight"), None)
    if embd is None:
        raise UnsupportedModelError(ckpt.path, "has no token embedding")
    if budget is not None:
        widths = _budget_widths(ckpt, tensors, budget, options.extra_precision, opts.outtype)
    for t in tensors:
        if t.quantized:
            t.bits = widths[t.hf_name]
            t.extra_precision = options.extra_precision and t.bits < ckpt.code_bits
    _check_tokenizer(root, arch, opts)
    return _Prepared(arch, cfg, tensors, widths, ckpt.info(embd).shape[0], allowed, opts)


def _map_tensors(ckpt, arch: gguf_arch.Arch, cfg: dict) -> list[_Tensor]:
    """Each tensor llama.cpp reads, under its GGUF name; a tensor without one, or two tensors under
    one name, are refused (llama.cpp would not load the file)."""
    names = gguf_arch.TensorNames(arch, int(cfg["num_hidden_layers"]))
    tensors, unknown, seen = [], [], {}
    for hf in ckpt.tensor_names():
        if names.skipped(hf):
            continue
        g = names.gguf_name(hf)
        if g is None:
            unknown.append(hf)
            continue
        if g in seen:
            raise UnsupportedModelError(ckpt.path, f"{hf} and {seen[g]} both map to GGUF tensor {g}")
        seen[g] = hf
        tensors.append(_tensor(ckpt, arch, cfg, hf, g))
    if unknown:
        more = f" and {len(unknown) - 3} more" if len(unknown) > 3 else ""
        raise UnsupportedModelError(
            ckpt.path, f"no GGUF name for {', '.join(unknown[:3])}{more} in architecture {arch.name}"
        )
    return tensors


def _tensor(ckpt, arch: gguf_arch.Arch, cfg: dict, hf: str, g: str) -> _Tensor:
    """One tensor with its norm offset and row order (llama.cpp's layout for ``g``), checked to fit."""
    info = ckpt.info(hf)
    t = _Tensor(hf, g, info.quantized, offset=gguf_arch.norm_offset(arch, hf))
    if info.quantized:
        if t.offset:
            raise UnsupportedModelError(
                ckpt.path, f"{hf}: a quantized norm weight cannot take Gemma's +1 offset"
            )
    elif info.dtype not in ("F16", "BF16", "F32", "F64"):
        raise UnsupportedModelError(
            ckpt.path, f"{hf}: {info.dtype} tensors have no place in a {arch.name} GGUF"
        )
    if len(info.shape) >= 1:
        t.perm = gguf_arch.row_permutation(arch, g, cfg, info.shape[0])
    return t


def _budget_widths(ckpt, tensors: list[_Tensor], budget: float, ep: bool, outtype: str) -> dict[str, int]:
    """Widths for a file of at most ``budget`` bits per weight, unquantized tensors counted as written."""
    from matq_converters.exporters.gguf.budget import file_budget_plan

    def dense(t: _Tensor) -> float:
        return dense_bits(ckpt.info(t.hf_name), t, outtype, 6)

    return file_budget_plan(ckpt, tensors, budget, ep, dense)


def _check_tokenizer(root: Path, arch: gguf_arch.Arch, opts: GGUFOptions) -> None:
    """The tokenizer's kind is one llama.cpp implements, and a BPE one's pre-tokenizer is known."""
    from matq_converters.exporters.gguf import vocab as gguf_vocab

    kind = gguf_vocab.detect(root, arch)
    if kind == "bpe" and not opts.tokenizer_pre:
        gguf_vocab.bpe_pre(root / "tokenizer.json")


def _file_budget(plan, opts: GGUFOptions) -> float | None:
    """``budget:BITS`` counts the file's bits per weight here (every tensor, as llama.cpp reports them)."""
    if not (isinstance(plan, str) and plan.startswith(BUDGET_PREFIX)):
        return None
    budget = parse_budget(plan)
    if opts.exact or opts.float_slices or opts.types:
        raise ConvertOptionError(None, f"{plan} chooses compact types itself; it cannot be combined with exact")
    return budget


def dense_type(info, t: _Tensor, outtype: str, width: int):
    """The type of an unquantized tensor, or None to store it as it is (see ``_dense``)."""
    from gguf import GGMLQuantizationType as T

    from matq_converters.exporters.gguf import blocks as B

    if len(info.shape) != 2 or t.offset or outtype not in ("auto", "q8_0") or t.gguf_name in NO_QUANT:
        return None
    cols = info.shape[1]
    if cols % 32:
        return None
    return T.Q8_0 if outtype == "q8_0" or width >= 7 or cols % B.QK_K else T.Q6_K


def dense_bits(info, t: _Tensor, outtype: str, width: int) -> float:
    """Bits an unquantized tensor takes in the file."""
    from matq_converters.exporters.gguf import blocks as B

    qtype = dense_type(info, t, outtype, width)
    if qtype is not None:
        return B.bits_per_weight(qtype) * info.numel
    if len(info.shape) != 2 or t.offset or outtype == "f32" or info.dtype in ("F32", "F64"):
        return 32.0 * info.numel  # as _dense writes them: F32
    return 16.0 * info.numel  # f16, bf16, or F16/BF16 as stored


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

    from matq_converters.exporters.gguf import vocab as gguf_vocab

    out = Path(out)
    with (
        AtomicOutput(out, GGUF_FILE, inputs=ckpt.input_paths(), overwrite=options.overwrite) as o,
        ckpt.carried_folder() as root,
    ):
        prep = _prepare(ckpt, options, root) if planned is None else planned
        w = gguf.GGUFWriter(None, prep.arch.name, use_temp_file=True)
        try:
            details, warnings = _write(w, ckpt, prep, root, options, progress)
            vocab = gguf_vocab.add_vocab(
                w, root, prep.arch, prep.n_vocab, prep.cfg, pre=prep.opts.tokenizer_pre
            )
            w.write_header_to_file(o.tmp)
            w.write_kv_data_to_file()
            w.write_tensors_to_file()
        finally:
            w.close()
        o.commit()
    details.update(tokenizer=vocab.kind, tokenizer_pre=vocab.pre, bytes=out.stat().st_size)
    return ConvertResult(out, _summary(out, details), details, [*warnings, *vocab.warnings])


def _summary(out: Path, details: dict) -> str:
    """One line: architecture, tensors by type, how many are bit-exact, bits per quantized weight."""
    counts = Counter(details["types"].values())
    kinds = ", ".join(f"{n} {t}" for t, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return (
        f"{out}: {details['arch']}, {len(details['types'])} tensors ({kinds}); "
        f"{details['exact_tensors']}/{details['quantized_tensors']} quantized tensors bit-exact; "
        f"{details['bits_per_weight']:.3f} bits per quantized weight"
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

    def add(self, name: str, qtype, data, info) -> None:
        self.n_bytes += int(np.asarray(data).nbytes)
        self.n_weights += info.numel
        self.types[name] = qtype.name
        if len(info.shape) == 2:
            self.weights_by_type[qtype.name] += info.numel

    def details(self, prep: _Prepared) -> dict:
        return {
            "arch": prep.arch.name,
            "types": self.types,
            "widths": prep.gguf_widths,
            "exact_tensors": self.exact,
            "quantized_tensors": self.quantized,
            "bits_per_weight": self.q_bits / self.q_weights if self.q_weights else 0.0,
            "file_bits_per_weight": 8 * self.n_bytes / self.n_weights if self.n_weights else 0.0,
            "refit_rel_rms": self.refit,
        }


def _write(w, ckpt, prep: _Prepared, root: Path, options: ConvertOptions, progress) -> tuple[dict, list[str]]:
    """Metadata and tensors into the writer (nothing touches the disk until the caller writes);
    returns the details of what was written and the architecture's warnings."""
    import gguf

    w.add_type(gguf.GGUFType.MODEL)
    w.add_name(str(ckpt.source.get("model") or prep.cfg.get("_name_or_path") or ckpt.root.name))
    warnings = list(prep.arch.hparams(w, prep.cfg, root) or [])
    w.add_vocab_size(prep.n_vocab)
    tally = _write_tensors(w, ckpt, prep, options, progress)
    if tally.weights_by_type:
        dominant = tally.weights_by_type.most_common(1)[0][0]
        w.add_file_type(gguf.LlamaFileType[_FILE_TYPES[dominant]])
    if any(v not in ("F32", "F16", "BF16") for v in tally.types.values()):
        w.add_quantization_version(gguf.GGML_QUANT_VERSION)
    _add_matq_keys(w, ckpt, prep, options, tally)
    return tally.details(prep), warnings


def _write_tensors(w, ckpt, prep: _Prepared, options: ConvertOptions, progress) -> _Tally:
    """Every tensor into the writer: quantized ones as their slices, the others at the output type."""
    from gguf import GGMLQuantizationType as T

    tally = _Tally()
    width = options.bits or (8 if min(prep.widths.values(), default=ckpt.code_bits) >= 7 else 6)
    outtype = "source" if prep.opts.outtype == "auto" and prep.opts.exact else prep.opts.outtype
    for t in prep.tensors:
        info = ckpt.info(t.hf_name)
        if t.quantized:
            qtype, data = _quantized(ckpt, prep, t, info, tally)
        else:
            qtype, data = _dense(ckpt, t, info, outtype, width)
        if qtype in (T.F16, T.F32):
            w.add_tensor(t.gguf_name, data)
        else:
            w.add_tensor(t.gguf_name, data, raw_dtype=qtype)
        tally.add(t.gguf_name, qtype, data, info)
        if progress:
            progress(1)
    return tally


def _quantized(ckpt, prep: _Prepared, t: _Tensor, info, tally: _Tally):
    """A quantized tensor's slice, encoded as asked (compact by default); counted in ``tally``."""
    from matq_converters.exporters.gguf import blocks as B

    k = ckpt.sliced_codes(t.hf_name, t.bits, t.extra_precision)
    a, z = ckpt.scale(t.hf_name), ckpt.zero(t.hf_name)
    if t.perm is not None:
        k, a, z = k[t.perm], a[t.perm], z[t.perm]
    sl = B.Slice(k, a, z, ckpt.code_bits, t.bits, info.group_size, t.extra_precision)
    if prep.opts.float_slices is not None:
        enc = _float_slice(sl, prep.opts.float_slices)
    elif prep.opts.exact or prep.allowed is not None:
        enc = B.encode(sl, prep.allowed)
    else:
        enc = B.encode_compact(sl)
    if not enc.exact:
        tally.refit[t.gguf_name] = B.rel_rms_error(enc, sl.dequantize())
    tally.quantized += 1
    tally.exact += enc.exact
    tally.q_bits += enc.data.nbytes * 8
    tally.q_weights += k.size
    return enc.qtype, enc.data


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


def _dense(ckpt, t: _Tensor, info, outtype: str, width: int):
    """An unquantized tensor: 1-D at F32 (llama.cpp's norms and biases), 2-D at ``outtype``
    (``auto``: Q8_0 for int8 files, else Q6_K where rows are multiples of 256, else Q8_0)."""
    import gguf
    from gguf import GGMLQuantizationType as T

    from matq_converters.exporters.gguf import blocks as B

    qtype = dense_type(info, t, outtype, width)
    if qtype is not None:
        enc = B.refit(_rows(ckpt.dequantize(t.hf_name).astype(np.float32), t.perm), qtype)
        return enc.qtype, enc.data
    if outtype in ("auto", "q8_0"):
        outtype = "source"
    if (
        len(info.shape) != 2
        or t.offset
        or (outtype == "source" and info.dtype in ("F32", "F64"))
        or outtype == "f32"
    ):
        x = ckpt.dequantize(t.hf_name).astype(np.float32)
        if t.offset:
            x = x + np.float32(t.offset)
        return T.F32, _rows(x, t.perm)
    if outtype == "source" and info.dtype == "F16":
        return T.F16, _rows(np.asarray(ckpt.dense(t.hf_name), np.float16), t.perm)
    if outtype == "source" and info.dtype == "BF16":
        raw = np.asarray(ckpt.dense(t.hf_name)).view(np.uint16)
        return T.BF16, _rows(raw, t.perm).view(np.uint8)
    x = ckpt.dequantize(t.hf_name).astype(np.float32)
    if outtype == "f16":
        return T.F16, _rows(x.astype(np.float16), t.perm)
    return T.BF16, _rows(gguf.quants.quantize(x, T.BF16), t.perm)


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


def _rows(x: np.ndarray, perm: np.ndarray | None) -> np.ndarray:
    return np.ascontiguousarray(x if perm is None else x[perm])
