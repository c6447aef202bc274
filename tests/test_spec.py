"""spec/v1 against the code: the worked example's bytes, the tables, and the manifest schema.

The spec is prose another team implements from, so every number in it that the code also holds is
checked here: regenerating the example gives identical bytes, every hexdump and table in the spec
matches the files and the library, the constant tables match matq_format/constants.py, and the JSON
Schema accepts what the library writes and rejects what the reader rejects.
"""

from __future__ import annotations

import importlib.util
import json
import re
import struct
from pathlib import Path

import jsonschema
import ml_dtypes
import numpy as np
import pytest
from safetensors import safe_open

import matq_format as mf
from matq_format import constants as C
from matq_format import errors, numerics
from matq_format.container import read_header
from matq_format.manifest import parse_manifest
from matq_format.planes import pack

ROOT = Path(__file__).resolve().parents[1]
SPEC_DIR = ROOT / "spec" / "v1"
SPEC = (SPEC_DIR / "README.md").read_text(encoding="utf-8")
EXAMPLE = SPEC_DIR / "example"
SCHEMA = json.loads((SPEC_DIR / "manifest.schema.json").read_text(encoding="utf-8"))
VALIDATOR = jsonschema.Draft202012Validator(SCHEMA)


def _load_make_example():
    spec = importlib.util.spec_from_file_location("make_example", EXAMPLE / "make_example.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


MAKE = _load_make_example()
SINGLE = EXAMPLE / MAKE.SINGLE_FILE
FOLDER = EXAMPLE / MAKE.FOLDER


# --- markdown parsing --------------------------------------------------------------------------
def _cells(line: str) -> list[str]:
    inner = line.strip()[1:-1]
    return [c.strip().replace("\\|", "|") for c in re.split(r"(?<!\\)\|", inner)]


def tables(text: str) -> list[list[list[str]]]:
    """Every markdown table: a list of rows (header first, separator dropped), each a list of cells."""
    out, cur = [], []
    for line in [*text.splitlines(), ""]:
        if line.startswith("|"):
            cells = _cells(line)
            if not all(re.fullmatch(r":?-+:?", c) for c in cells):
                cur.append(cells)
        elif cur:
            out.append(cur)
            cur = []
    return out


def after(marker: str) -> str:
    """The spec's text from an HTML comment marker on."""
    i = SPEC.index(f"<!-- {marker} -->")
    return SPEC[i + len(marker) + 9 :]


def table_after(marker: str) -> list[list[str]]:
    return tables(after(marker))[0]


def block_after(marker: str) -> str:
    """The first fenced code block after a marker."""
    m = re.search(r"```[a-z]*\n(.*?)\n```", after(marker), re.S)
    return m.group(1)


def code(cell: str) -> str:
    m = re.fullmatch(r"`([^`]*)`", cell)
    assert m, f"expected a single code span, got {cell!r}"
    return m.group(1)


# --- the worked example ------------------------------------------------------------------------
def _files(root: Path) -> dict[str, bytes]:
    return {
        p.relative_to(root).as_posix(): p.read_bytes()
        for p in sorted(root.rglob("*"))
        if p.is_file() and p.suffix != ".py" and "__pycache__" not in p.parts
    }


def test_example_regenerates_identically(tmp_path):
    MAKE.main(tmp_path)
    fresh, stored = _files(tmp_path), _files(EXAMPLE)
    assert sorted(fresh) == sorted(stored)
    assert len(stored) == 14  # 1.0 single file, 8 plane files, base and config.json; 1.1 stacked; 1.2 constant zero; 1.2 widths
    for name in stored:
        assert fresh[name] == stored[name], f"{name} differs from the checked-in example"


def test_example_reads_back_in_both_forms():
    for path in (SINGLE, FOLDER):
        ckpt = mf.open(path)
        ckpt.verify()
        assert ckpt.tensor_names() == ["fc.weight", "norm.weight"]
        np.testing.assert_array_equal(ckpt.codes("fc.weight"), MAKE.CODES)
        np.testing.assert_array_equal(ckpt.scale("fc.weight"), MAKE.SCALE)
        np.testing.assert_array_equal(ckpt.zero("fc.weight"), MAKE.ZERO)
        np.testing.assert_array_equal(ckpt.dense("norm.weight"), MAKE.NORM)
        for f in ckpt.files():
            if f.suffix == ".safetensors":  # every matq file is a plain safetensors file
                with safe_open(f, "np") as st:
                    assert set(st.keys()) == set(read_header(f).entries)
    assert mf.open(FOLDER).carried_files() == {"config.json": FOLDER / "config.json"}


def _parse_hexdump(text: str) -> bytes:
    """``hexdump -C`` lines back to bytes (checking each line's offset and its ASCII column)."""
    out = bytearray()
    lines = text.splitlines()
    for line in lines[:-1]:
        m = re.fullmatch(r"([0-9a-f]{8})  (.{49}) \|(.*)\|", line)
        assert m, f"bad hexdump line {line!r}"
        assert int(m.group(1), 16) == len(out)
        chunk = bytes.fromhex(m.group(2))
        assert m.group(3) == "".join(chr(b) if 32 <= b < 127 else "." for b in chunk)
        out += chunk
    assert int(lines[-1], 16) == len(out)  # the closing line is the total size
    return bytes(out)


@pytest.mark.parametrize("name", ["tiny.matq.safetensors", "tiny-matq/matq-plane-7.safetensors"])
def test_hexdump_in_spec_matches_file(name):
    assert _parse_hexdump(block_after(f"hexdump {name}")) == (EXAMPLE / name).read_bytes()


@pytest.mark.parametrize("name", ["tiny.matq.safetensors", "tiny-matq/matq-plane-7.safetensors"])
def test_annotated_bytes_match_file(name):
    data = (EXAMPLE / name).read_bytes()
    lines = block_after(f"annotated {name}").splitlines()
    assert lines
    for line in lines:
        m = re.match(r"0x([0-9a-f]{4})  ((?:[0-9a-f]{2} )*[0-9a-f]{2})   ", line)
        assert m, f"bad annotated line {line!r}"
        off, want = int(m.group(1), 16), bytes.fromhex(m.group(2))
        assert data[off : off + len(want)] == want, line


def test_single_file_layout_numbers():
    """The prose of 14.4: sizes, header length, padding, data start, entry offsets."""
    data = SINGLE.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    text = data[8 : 8 + n].rstrip(b" ")
    assert (len(data), n, len(text), n - len(text)) == (2286, 2200, 2197, 3)
    h = read_header(SINGLE)
    assert h.data_start == 2208 and h.data_start % C.HEADER_ALIGN_BYTES == 0
    layout = {r[2]: (int(r[0], 16), int(r[1])) for r in tables(SPEC[SPEC.index("### 14.4") :])[0][1:]}
    spans = {
        "fc.weight@scale": "`fc.weight@scale`, F16 [2, 1], data offsets 64..68",
        "fc.weight@zero": "`fc.weight@zero`, U8 [2, 1], data offsets 68..70",
        "norm.weight": "`norm.weight`, F32 [2], data offsets 70..78",
    }
    for ename, label in spans.items():
        e = h.entries[ename]
        assert layout[label] == (h.data_start + e.start, e.nbytes)
        assert label.endswith(f"{e.start}..{e.end}")
    assert all(h.entries[f"fc.weight@plane{k}"].nbytes == 8 for k in range(8))
    sizes = {p.name: p.stat().st_size for p in FOLDER.iterdir()}
    assert sizes["matq.safetensors"] == 2318 and sizes["config.json"] == 26
    assert all(sizes[C.PLANE_FILENAME.format(k=k)] == 144 for k in range(8))


@pytest.mark.parametrize("name", ["tiny.matq.safetensors", "tiny-matq/matq.safetensors"])
def test_manifest_in_spec_matches_file(name):
    ckpt = mf.open(EXAMPLE / name)
    assert json.loads(block_after(f"manifest {name}")) == ckpt.manifest
    crc = read_header(ckpt.path).metadata[C.METADATA_KEY_MANIFEST_CRC]
    if name == "tiny.matq.safetensors":
        assert f'"matq.crc32":"{crc}"' in SPEC and f"`{crc}`" in SPEC


def test_example_tables_match_library():
    codes = table_after("example-codes")
    assert [int(x) for x in codes[1][1:]] == MAKE.CODES.reshape(-1).tolist()
    planes = pack(MAKE.CODES, 8)
    for row in table_after("example-planes")[1:]:
        k = int(row[0])
        bits0, bits1 = code(row[1]), code(row[3])
        assert bits0 == "".join(str((q >> k) & 1) for q in MAKE.CODES[0][::-1])
        assert bits1 == "".join(str((q >> k) & 1) for q in MAKE.CODES[1][::-1])
        want = bytes([int(code(row[2]), 16), int(code(row[4]), 16)]) + bytes.fromhex(code(row[5]))
        assert planes[k].tobytes() == want
    ckpt = mf.open(SINGLE)
    for row in table_after("example-slices")[1:]:
        r, ep = int(row[0].rstrip("e")), row[0].endswith("e")
        hi, lo = (int(x) for x in row[1].split(".."))
        assert numerics.planes_needed(8, r) == tuple(range(hi, lo - 1, -1))
        k = ckpt.sliced_codes("fc.weight", r, ep)
        assert [[int(x) for x in row[2].split()], [int(x) for x in row[3].split()]] == k.tolist()
    for row in table_after("example-weights")[1:]:
        r, ep = int(row[0].rstrip("e")), row[0].endswith("e")
        w = ckpt.dequantize("fc.weight", r, ep)
        want = np.array([[float(x) for x in row[1].split()], [float(x) for x in row[2].split()]], np.float32)
        assert w.dtype == np.float32 and w.tobytes() == want.tobytes()


def test_planes_needed_table():
    rows = [r for r in tables(SPEC) if r[0][0] == "Width r"][0][1:]
    assert [int(r[0]) for r in rows] == list(range(8, 0, -1))
    for r, planes, nfiles, share in rows:
        need = numerics.planes_needed(8, int(r))
        assert tuple(int(k) for k in planes.split()) == need
        assert int(nfiles) == len(need) and share == f"{len(need)}/8"


# --- tables against constants.py --------------------------------------------------------------
def _value(cell: str):
    v = code(cell)
    if re.fullmatch(r"[0-9]+", v):
        return int(v)
    if m := re.fullmatch(r"([0-9]+)\^([0-9]+)", v):
        return int(m.group(1)) ** int(m.group(2))
    return v


def constant_rows() -> dict[str, object]:
    found: dict[str, object] = {}
    for t in tables(SPEC):
        if t[0][0] != "Constant":
            continue
        for row in t[1:]:
            name = code(row[0])
            assert name not in found, f"{name} documented twice"
            found[name] = _value(row[1])
    return found


# Implementation choices and groupings that the spec states in other forms (the dtype table).
NOT_IN_CONSTANT_TABLES = {
    "MAX_CODE_BITS_IMPL",
    "CARRY_TOTAL_MAX_BYTES",
    "SLICE_WIDTHS",
    "DTYPES",
    "FLOAT_DTYPES",
    "SCALE_DTYPES",
    "ZERO_DTYPES",
    "QUANTIZABLE_DTYPES",
    "IMPORTANCE_DTYPES",
    "GRANULARITIES",
    "KINDS",
    "SCHEMES",
}


def test_constant_tables_match_constants_py():
    documented = constant_rows()
    for name, value in documented.items():
        assert hasattr(C, name), f"spec documents {name}, which constants.py does not define"
        actual = getattr(C, name)
        if isinstance(actual, re.Pattern):
            actual = actual.pattern
        elif name == "FORMAT_VERSION":
            actual = "{}.{}".format(*actual)
        assert value == actual, f"{name}: spec says {value!r}, constants.py {actual!r}"
    public = {n for n in vars(C) if n.isupper()}
    missing = public - set(documented) - NOT_IN_CONSTANT_TABLES
    assert not missing, f"constants.py defines {sorted(missing)}, which the spec's tables do not list"
    assert set(C.GRANULARITIES) == {documented["GRANULARITY_CHANNEL"], documented["GRANULARITY_GROUP"]}
    assert set(C.KINDS) == {documented["KIND_DENSE"], documented["KIND_QUANTIZED"]}
    assert set(C.SCHEMES) == {documented["SCHEME_ASYMMETRIC"], documented["SCHEME_SYMMETRIC"]}
    # Code bits and the implementation limit the spec mentions in prose.
    assert f"supports `{C.MIN_CODE_BITS} <= c <= {C.MAX_CODE_BITS_IMPL}`" in SPEC


def test_dtype_table_matches_constants_py():
    t = [t for t in tables(SPEC) if t[0][:2] == ["Dtype", "Bytes"]][0]
    rows = {code(r[0]): r for r in t[1:]}
    assert list(rows) == list(C.DTYPES)
    for name, row in rows.items():
        assert int(row[1]) == C.DTYPES[name][1]
    ticked = {col: tuple(n for n, r in rows.items() if r[i].strip() == "✓") for i, col in enumerate(t[0])}
    assert ticked["Scale"] == C.SCALE_DTYPES
    assert ticked["Zero"] == C.ZERO_DTYPES
    assert ticked["Source of a quantized tensor"] == C.QUANTIZABLE_DTYPES


def test_schema_enums_match_constants_py():
    d = SCHEMA["$defs"]
    assert d["dtype"]["enum"] == list(C.DTYPES)
    q = d["quantized"]["properties"]
    assert q["dtype"]["enum"] == list(C.QUANTIZABLE_DTYPES)
    assert q["scale_dtype"]["enum"] == list(C.SCALE_DTYPES)
    assert q["zero_dtype"]["enum"] == list(C.ZERO_DTYPES)
    assert q["granularity"]["enum"] == list(C.GRANULARITIES)
    assert d["tensor"]["properties"]["kind"]["enum"] == sorted(C.KINDS)
    assert d["extension_name"]["pattern"] == C.EXTENSION_NAME_RE.pattern
    assert d["dim"]["maximum"] == C.MAX_DIM_SIZE
    assert SCHEMA["properties"]["tensors"]["maxProperties"] == C.MAX_TENSORS
    assert SCHEMA["properties"]["entries"]["maxProperties"] == C.MAX_ENTRIES
    cb = SCHEMA["properties"]["code_bits"]
    assert (cb["minimum"], cb["maximum"]) == (C.MIN_CODE_BITS, C.MAX_CODE_BITS_SPEC)
    assert SCHEMA["properties"]["version"]["pattern"].startswith(f"^{C.FORMAT_VERSION[0]}\\.")


def test_error_table_names_real_error_classes():
    t = [t for t in tables(SPEC) if t[0][-1] == "Reference error"][0]
    names = {code(r[-1]) for r in t[1:]}
    for n in names:
        cls = getattr(errors, n, None)
        assert isinstance(cls, type) and issubclass(cls, errors.FormatError), n
    # Every way a file can be wrong has a row.
    assert names == {
        c.__name__ for c in vars(errors).values() if isinstance(c, type) and issubclass(c, errors.FormatError)
    }


def test_index_links_exist():
    index = (ROOT / "spec" / "README.md").read_text(encoding="utf-8")
    for link in re.findall(r"\]\(([^)#]+)\)", index):
        assert (ROOT / "spec" / link).exists(), link


# --- the JSON Schema ---------------------------------------------------------------------------
def _manifest_of(path: Path) -> dict:
    """The manifest as stored, read from the header (no reader validation in between)."""
    return json.loads(read_header(path).metadata[C.METADATA_KEY_MANIFEST])


def _library_manifests(tmp: Path) -> list[dict]:
    rng = np.random.default_rng(0)
    out = []

    def quantized(w, name, c, rows, cols, group_size=None, **kw):
        x = rng.normal(size=(rows, cols)).astype(np.float32)
        sym = kw.get("scheme") == "symmetric"
        s, z = numerics.minmax_params(
            x, c, group_size, symmetric=sym, scale_dtype=kw.get("scale_dtype", "F16")
        )
        w.add_quantized(name, numerics.quantize(x, s, z, c, group_size), s, z, group_size=group_size, **kw)

    hf = tmp / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llama"}')
    (hf / "tok").mkdir()
    (hf / "tok" / "tokenizer.json").write_text("{}")
    with mf.CheckpointWriter(tmp / "a", 8, carry_from=hf, source={"tool": "test", "n": [1, 2]}) as w:
        quantized(w, "model.layers.0.mlp.up_proj.weight", 8, 4, 70, 32, extra_precision=(2, 4))
        quantized(w, "model.layers.0.mlp.down_proj.weight", 8, 3, 16, scheme="symmetric", scale_dtype="BF16")
        w.add_dense("model.embed_tokens.weight", rng.normal(size=(5, 3)).astype(ml_dtypes.bfloat16))
        w.add_dense("scalar", np.int64(3))
    with mf.CheckpointWriter(tmp / "b.safetensors", 4, single_file=True) as w:
        quantized(w, "q", 4, 2, 9, 4, zero_dtype="F32", scale_dtype="F32", dtype="F16", keep_bits=2)
    with mf.CheckpointWriter(
        tmp / "c", 3, extensions={"org.example.stats": {"x": 1}}, must_understand=["org.example.stats"]
    ) as w:
        quantized(w, "q", 3, 1, 1)
    for p in (tmp / "a" / C.BASE_FILENAME, tmp / "b.safetensors", tmp / "c" / C.BASE_FILENAME):
        out.append(_manifest_of(p))
    mf.slice_checkpoint(tmp / "a", tmp / "d", plan="pyramid")
    out.append(_manifest_of(tmp / "d" / C.BASE_FILENAME))
    return out


def test_schema_is_valid_draft_2020_12():
    assert SCHEMA["$schema"] == "https://json-schema.org/draft/2020-12/schema"
    jsonschema.Draft202012Validator.check_schema(SCHEMA)


def test_schema_accepts_manifests_the_library_writes(tmp_path):
    manifests = [_manifest_of(SINGLE), _manifest_of(FOLDER / C.BASE_FILENAME), *_library_manifests(tmp_path)]
    for m in manifests:
        assert [e.message for e in VALIDATOR.iter_errors(m)] == []
    assert {m["code_bits"] for m in manifests} == {8, 4, 3}
    assert any(m["carried"] for m in manifests) and any(m["extensions"] for m in manifests)


def _set(path: str, value):
    """A mutation setting a key (dotted path into the manifest; value DELETE removes it)."""

    def f(m):
        *parents, last = path.split("|")
        for p in parents:
            m = m[p]
        if value is DELETE:
            del m[last]
        else:
            m[last] = value

    return f


def _rename(path: str, old: str, new: str):
    def f(m):
        d = m
        for p in path.split("|") if path else []:
            d = d[p]
        d[new] = d.pop(old)

    return f


DELETE = object()
FC = "tensors|fc.weight"
# (id, mutation, does matq_format.manifest.parse_manifest reject it too?). False marks rules that the
# schema checks but that manifest parsing leaves alone: unknown keys (readers MUST ignore them; only
# 1.0 writers may not write them), entry names (checked later against the tensors, when a checkpoint
# is opened), and writer rules the reader is lenient about (leading zeros in `version`, a base file
# listed in `files`, extension names that do not match EXTENSION_NAME_RE).
BROKEN = [
    ("no-format", _set("format", DELETE), True),
    ("format-other", _set("format", "gguf"), True),
    ("major-2", _set("version", "2.0"), True),
    ("version-leading-zero", _set("version", "1.01"), False),
    ("version-number", _set("version", 1.0), True),
    ("code-bits-1", _set("code_bits", 1), True),
    ("code-bits-17", _set("code_bits", 17), True),
    ("code-bits-string", _set("code_bits", "8"), True),
    ("code-bits-bool", _set("code_bits", True), True),
    ("no-tensors", _set("tensors", DELETE), True),
    ("no-entries", _set("entries", DELETE), True),
    ("no-files", _set("files", DELETE), True),
    ("files-list", _set("files", []), True),
    ("unknown-kind", _set(f"{FC}|kind", "sparse"), True),
    ("unknown-dtype", _set(f"{FC}|dtype", "F17"), True),
    ("quantized-int-dtype", _set(f"{FC}|dtype", "I32"), True),
    ("quantized-3d", _set(f"{FC}|shape", [2, 8, 1]), True),
    ("negative-dim", _set("tensors|norm.weight|shape", [-1]), True),
    ("nine-dims", _set("tensors|norm.weight|shape", [1] * 9), True),
    ("huge-dim", _set("tensors|norm.weight|shape", [2**40 + 1]), True),
    ("no-granularity", _set(f"{FC}|granularity", DELETE), True),
    ("group-without-size", _set(f"{FC}|granularity", "group"), True),
    ("channel-with-size", _set(f"{FC}|group_size", 8), True),
    ("group-size-0", lambda m: m["tensors"]["fc.weight"].update(granularity="group", group_size=0), True),
    ("unknown-scheme", _set(f"{FC}|scheme", "nf4"), True),
    ("scale-u8", _set(f"{FC}|scale_dtype", "U8"), True),
    ("zero-i8", _set(f"{FC}|zero_dtype", "I8"), True),
    ("extra-precision-0", _set(f"{FC}|extra_precision", [0]), True),
    ("extra-precision-twice", _set(f"{FC}|extra_precision", [2, 2]), True),
    ("planes-twice", _set(f"{FC}|planes", [7, 7]), True),
    ("plane-negative", _set(f"{FC}|planes", [-1]), True),
    ("planes-missing", _set(f"{FC}|planes", DELETE), True),
    ("crc-upper", _set("entries|norm.weight|crc32", "EE85C9DB"), True),
    ("crc-short", _set("entries|norm.weight|crc32", "e85c9db"), True),
    ("entry-no-file", _set("entries|norm.weight|file", DELETE), True),
    ("tensor-name-at", _rename("tensors", "norm.weight", "norm@weight"), True),
    ("file-name-slash", _set("files|sub/x.safetensors", {"bytes": 1}), True),
    ("file-name-dot", _set("files|.hidden", {"bytes": 1}), True),
    ("file-no-bytes", _set("files|x.safetensors", {}), True),
    ("file-planes-out-of-range", _set("files|x.safetensors", {"bytes": 1, "planes": [16]}), True),
    ("carried-parent", _set("carried|../config.json", {"bytes": 1, "sha256": "0" * 64}), True),
    ("carried-absolute", _set("carried|/etc/passwd", {"bytes": 1, "sha256": "0" * 64}), True),
    ("carried-bad-sha", _set("carried|config.json", {"bytes": 1, "sha256": "xyz"}), True),
    ("must-understand-string", _set("must_understand", "org.example.x"), True),
    ("extensions-list", _set("extensions", []), True),
    ("source-string", _set("source", "me"), True),
    ("files-lists-base", _set("files|matq.safetensors", {"bytes": 1}), False),
    ("extension-bad-name", _set("extensions|Bad Name", 1), False),
    (
        "entry-bad-plane-name",
        _set("entries|fc.weight@plane16", {"file": "matq.safetensors", "crc32": "0" * 8}),
        False,
    ),
    ("unknown-key-1.0", _set("granularty", "group"), False),
    ("unknown-tensor-key-1.0", _set(f"{FC}|note", 1), False),
]
VALID = [
    (
        "newer-minor-unknown-keys",
        lambda m: (m.update(version="1.7", future={"a": 1}), m["tensors"]["fc.weight"].update(note=1)),
    ),
    (
        "extension-keys-1.0",
        lambda m: (m.update({"org.example.x": 1}), m["tensors"]["fc.weight"].update({"org.example.y": [1]})),
    ),
    ("extension-data", _set("extensions", {"org.example.hessian": {"any": ["json", 1]}})),
    ("channel-no-group-size", _set(f"{FC}|group_size", DELETE)),
    (
        "optional-keys-absent",
        lambda m: [m.pop(k) for k in ("must_understand", "extensions", "carried", "source")],
    ),
    ("sliced-planes", _set(f"{FC}|planes", [7, 6, 5])),
    ("group", lambda m: m["tensors"]["fc.weight"].update(granularity="group", group_size=128)),
]


def _example_manifest() -> dict:
    return _manifest_of(SINGLE)


@pytest.mark.parametrize("mutate,reader_rejects", [(b[1], b[2]) for b in BROKEN], ids=[b[0] for b in BROKEN])
def test_schema_rejects_broken_manifests(mutate, reader_rejects, tmp_path):
    m = _example_manifest()
    mutate(m)
    assert not VALIDATOR.is_valid(m)
    if reader_rejects:
        with pytest.raises((errors.HeaderError, errors.UnsupportedVersionError)):
            parse_manifest(tmp_path, json.dumps(m))


@pytest.mark.parametrize("mutate", [v[1] for v in VALID], ids=[v[0] for v in VALID])
def test_schema_and_reader_accept_what_the_spec_allows(mutate, tmp_path):
    m = _example_manifest()
    mutate(m)
    assert [e.message for e in VALIDATOR.iter_errors(m)] == []
    parse_manifest(tmp_path, json.dumps(m))
