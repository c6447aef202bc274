"""Single source of truth for the matq on-disk format (spec/v1/README.md mirrors these tables).

Retired values stay reserved here forever and are never reused.
"""

from __future__ import annotations

import re

FORMAT_NAME = "matq"
FORMAT_VERSION = (1, 2)
"""(major, minor) of the newest spec this library implements. Minor versions only add optional fields;
anything else bumps the major. Writers write the lowest version a checkpoint needs (1.0 unless it
holds a stacked tensor, 1.1, or a constant zero point or per-width parameters, 1.2), so files
that use nothing new stay byte for byte what 1.0 wrote."""

# --- container -------------------------------------------------------------------------------
BASE_FILENAME = "matq.safetensors"
"""Entry point of a checkpoint folder; holds the manifest, parameters and unquantized tensors."""
PLANE_FILENAME = "matq-plane-{k}.safetensors"
"""Conventional name of the file holding bit-plane k (0 = least significant) of every tensor."""

METADATA_KEY_FORMAT = "format"
METADATA_KEY_MANIFEST = "matq"
METADATA_KEY_MANIFEST_CRC = "matq.crc32"
METADATA_KEY_ROLE = "matq.role"
ROLE_BASE = "base"
ROLE_PLANES = "planes"
ROLE_WIDTH = "width"
WIDTH_FILENAME = "matq-width-{r}.safetensors"
"""Conventional name of the file holding every tensor's width-r block parameters (spec 10.7)."""

HEADER_PREFIX_BYTES = 8
"""safetensors: little-endian u64 header length, then that many bytes of UTF-8 JSON."""
MAX_HEADER_BYTES = 100_000_000
"""The safetensors reference limit; larger headers are rejected before they are read."""
MAX_TENSORS = 2**18
MAX_ENTRIES = 2**22
"""Most entries in one file's header, and in the manifest (a quantized tensor has c + 2, c + 1 with one
zero point in its record)."""
MAX_NAME_BYTES = 1024
"""Longest tensor name, in bytes of UTF-8."""
MAX_DIMS = 8
MAX_DIM_SIZE = 2**40
PLANE_ALIGN_BYTES = 8
"""Every plane entry is zero-padded to a multiple of 8 bytes (64 codes) so kernels work in u64 words."""
HEADER_ALIGN_BYTES = 8
CARRY_MAX_BYTES = 64 << 20
"""Largest file carried from the source model (config, tokenizer); larger ones are not carried."""
CARRY_TOTAL_MAX_BYTES = 256 << 20
"""Most bytes all carried files of one checkpoint may come to (an implementation limit: many names
linked to one sparse 64 MiB file would otherwise make a small checkpoint read, hold and copy GBs)."""

# --- entries ---------------------------------------------------------------------------------
ENTRY_SEP = "@"
PLANE_SUFFIX = "plane{k}"
SCALE_SUFFIX = "scale"
ZERO_SUFFIX = "zero"
WIDTH_SUFFIX = "w{r}.{p}"
"""Part naming a width's block parameter ``p`` (spec 10.7): ``fc.weight@w2.d``."""
IMPORTANCE_SUFFIX = "importance"
"""Part naming a tensor's per-input-feature importance (spec 10.8): ``fc.weight@importance``."""
SENSITIVITY_SUFFIX = "sensitivity"
"""Part naming a tensor's per-output-feature sensitivity (spec 10.8): ``fc.weight@sensitivity``."""
ENTRY_RE = re.compile(
    r"^(?P<tensor>.+)@(?P<part>plane(?P<k>[0-9]|1[0-5])|scale|zero|w(?P<r>[1-9]|1[0-6])\.(?P<p>d|sc|dmin|mn)"
    r"|importance|sensitivity)$"
)
ENTRY_EXTENSION_KEY = "extension"
"""Entry record key (1.2, spec 5.6): the extension an entry belongs to. A reader that does not
implement that extension leaves the entry out of the entry-set check (unless it is in
``must_understand``, which the reader already refused)."""

# --- codes -----------------------------------------------------------------------------------
MIN_CODE_BITS = 2
MAX_CODE_BITS_SPEC = 16
"""The spec allows c up to 16; this implementation stores codes in bytes and supports c <= 8."""
MAX_CODE_BITS_IMPL = 8
DEFAULT_CODE_BITS = 8

# --- quantization parameters ----------------------------------------------------------------
GRANULARITY_CHANNEL = "channel"
GRANULARITY_GROUP = "group"
GRANULARITIES = (GRANULARITY_CHANNEL, GRANULARITY_GROUP)
SCHEME_ASYMMETRIC = "asymmetric"
SCHEME_SYMMETRIC = "symmetric"
SCHEMES = (SCHEME_ASYMMETRIC, SCHEME_SYMMETRIC)
"""Informative label of how the zero points were chosen; dequantization never depends on it."""
KIND_QUANTIZED = "quantized"
KIND_DENSE = "dense"
KINDS = (KIND_QUANTIZED, KIND_DENSE)

# safetensors dtype names: name -> (numpy dtype string, item size). BF16 and F8 have no numpy
# dtype of their own and are read as raw unsigned integers of the same width.
DTYPES: dict[str, tuple[str, int]] = {
    "BOOL": ("|b1", 1),
    "U8": ("|u1", 1),
    "I8": ("|i1", 1),
    "F8_E4M3": ("|u1", 1),
    "F8_E5M2": ("|u1", 1),
    "U16": ("<u2", 2),
    "I16": ("<i2", 2),
    "F16": ("<f2", 2),
    "BF16": ("<u2", 2),
    "U32": ("<u4", 4),
    "I32": ("<i4", 4),
    "F32": ("<f4", 4),
    "U64": ("<u8", 8),
    "I64": ("<i8", 8),
    "F64": ("<f8", 8),
}
FLOAT_DTYPES = ("F16", "BF16", "F32", "F64")
SCALE_DTYPES = ("F16", "BF16", "F32")
ZERO_DTYPES = ("U8", "U16", "F16", "BF16", "F32")
QUANTIZABLE_DTYPES = ("F16", "BF16", "F32")

# --- serving widths --------------------------------------------------------------------------
SLICE_WIDTHS = (8, 6, 4, 3, 2)
EXTENSION_NAME_RE = re.compile(r"^[a-z][a-z0-9_]*(\.[a-z][a-z0-9_]*)+$")
"""Extension names are dotted lower-case identifiers, e.g. ``org.example.hessian``."""
EXT_SIGNED_SCALES = "matq.signed_scales"
"""Extension (spec 10.4): scales may be negative, so that a group's largest-magnitude weight lands
on code 0 whatever its sign and every slice holds it exactly. Always in ``must_understand``."""
EXT_STACKED = "matq.stacked"
"""Extension (spec 10.5, version 1.1): a quantized tensor of more than two dimensions (a stack of
matrices, e.g. fused mixture-of-experts weights) or with its input features on the next-to-last
axis. Always in ``must_understand`` when such a tensor is present."""
EXT_CONSTANT_ZERO = "matq.constant_zero"
"""Extension (spec 10.6, version 1.2): a quantized tensor whose zero points all equal one integer
records it once, as its ``zero_point`` key, and has no ``@zero`` entry (a symmetric grid stores
nothing per group). Always in ``must_understand`` when such a tensor is present."""
ZERO_POINT_KEY = "zero_point"
"""The tensor record's key (1.2) holding a constant zero point (spec 10.6)."""
EXT_WIDTH_PARAMS = "matq.width_params"
"""Extension (spec 10.7, version 1.2): a width r of a quantized tensor may carry its own two-level
block parameters, refitted to its nested codes, in a file of their own. Always in
``must_understand`` when present (a reader that ignored them would find entries it cannot place)."""
EXT_IMPORTANCE = "matq.importance"
"""Extension (spec 10.8, version 1.2): a quantized tensor's per-input-feature importance (mean squared
calibration activation), an entry ``t@importance`` in the base file, and beside it, optionally, its
per-output-feature sensitivity (mean squared gradient of the loss at the tensor's output),
``t@sensitivity``. Never in ``must_understand``: it changes no value a reader returns."""
IMPORTANCE_DTYPES = ("F16", "F32")
WIDTH_SUPER_BLOCK = 256
"""Columns per super-block of per-width parameters: one fp16 ``d`` (and ``dmin``) each, as K-quants."""
WIDTH_SC_AFFINE = 63
"""Largest ``|sc|`` and ``mn`` of a width with a minimum (Q4_K/Q5_K's 6 bits; Q2_K uses up to 15)."""
WIDTH_SC_SYMMETRIC = 32
"""``sc`` of a width without a minimum lies in ``-32 .. 31`` (Q3_K's signed 6-bit sub-block scales)."""
