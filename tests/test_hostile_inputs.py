"""Hostile or malformed inputs end in one line and exit 1, never "internal error" (issue 24)."""

from __future__ import annotations

import hashlib
import json
import shutil

import numpy as np
import pytest
from test_format_errors import rewrite_manifest
from test_output_safety import run, small_checkpoint

import matq_format as mf
from matq_format import constants as C
from matq_format.errors import WriterError

DEEP = "[" * 100_000 + "]" * 100_000


@pytest.mark.parametrize(
    ("text", "said"),
    [
        ('{"default": true}', "width true is not a whole number"),
        ('{"default": 4.9}', "width 4.9 is not a whole number"),
        ('{"default": 1e400}', "is not a whole number"),
        ('{"layers": {"0": "4"}}', "width \"4\" is not a whole number"),
        ('{"layers": [4]}', "layers must be an object"),
        ('{"default": ' + DEEP + "}", "not a valid plan file"),
    ],
)
def test_a_plan_file_whose_widths_are_not_whole_numbers(tmp_path, text, said):
    ck = small_checkpoint(tmp_path / "ck")
    plan = tmp_path / "plan.json"
    plan.write_text(text)
    r = run("slice", ck, "--plan", plan, "-o", tmp_path / "out")
    assert r.exit_code == 1 and r.output.count("\n") == 1 and said in r.output, r.output
    assert "internal error" not in r.output and not (tmp_path / "out").exists()


def test_slicing_an_empty_quantized_tensor(tmp_path):
    """A [0, 128] weight holds no weight: slicing it publishes and reports, with exit 0."""
    with mf.CheckpointWriter(tmp_path / "ck") as w:
        w.add_quantized(
            "a.weight", np.zeros((0, 128), np.uint8), np.zeros((0, 1), np.float32), np.zeros((0, 1), np.float32)
        )
        w.add_dense("n", np.ones(4, np.float32))
    r = run("slice", tmp_path / "ck", "--bits", "4", "-o", tmp_path / "out")
    assert r.exit_code == 0 and "bits per quantized weight" in r.output, r.output
    assert mf.open(tmp_path / "out").info("a.weight").shape == (0, 128)
    assert json.loads(run("inspect", tmp_path / "out", "--json").output)["tensors"]



@pytest.mark.parametrize(
    "command", [["inspect"], ["verify"], ["slice", "--bits", "4", "-o", "OUT"], ["convert", "--to", "hf", "--bits", "4", "-o", "OUT"]]
)
@pytest.mark.parametrize("named", ["folder", "base file"])
def test_a_base_file_linked_outside_the_folder_is_refused(tmp_path, command, named):
    real = small_checkpoint(tmp_path / "real")
    ck = tmp_path / "ck"
    ck.mkdir()
    for f in real.iterdir():
        (ck / f.name).write_bytes(f.read_bytes())
    (ck / "matq.safetensors").unlink()
    (ck / "matq.safetensors").symlink_to(real / "matq.safetensors")
    target = ck if named == "folder" else ck / "matq.safetensors"
    args = [str(tmp_path / "out") if a == "OUT" else a for a in command]
    r = run(command[0], target, *args[1:])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "outside the model folder" in r.output, r.output
    assert not (tmp_path / "out").exists()


def test_waiting_on_the_write_queue_is_linear_in_its_length():
    """Quantizing a model of many tensors queues a write per tensor; waiting for the last one must
    not search the queue at every step (it did: 300k tensors ran for minutes)."""
    import threading
    import time

    from matq_converters.importers.hf.ptq import WriteBehind

    gate = threading.Event()
    done = []
    with WriteBehind(progress=done.append) as sink:
        sink.put(gate.wait, 1)  # holds the writer thread, so every later job stays queued
        tickets = [sink.put(lambda: None, 1) for _ in range(50_000)]
        gate.set()
        t0 = time.perf_counter()
        sink.wait(tickets[-1])
        took = time.perf_counter() - t0
    assert len(done) == 50_001
    assert took < 10, f"waiting on 50,000 queued writes took {took:.1f} s"


@pytest.mark.parametrize(
    "command",
    [
        ["slice", "CK", "--bits", "4", "-o", ""],
        ["convert", "CK", "--to", "hf", "--bits", "4", "-o", ""],
        ["convert", "CK", "--to", "gguf", "--bits", "4", "-o", ""],
        ["quantize", "CK", "-o", ""],
        ["pull", "a/b", "-o", ""],
        ["inspect", ""],
    ],
)
def test_an_empty_path_is_refused_not_taken_for_the_current_folder(tmp_path, monkeypatch, command):
    ck = small_checkpoint(tmp_path / "ck")
    monkeypatch.chdir(tmp_path)
    r = run(*[str(ck) if a == "CK" else a for a in command])
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "is empty" in r.output, r.output
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ck"]


def _one_line_error(r, *said):
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "internal error" not in r.output and all(s in r.output for s in said), r.output


def _sparse(path, size):
    with open(path, "wb") as f:
        f.truncate(size)
    digest = hashlib.sha256()
    for _ in range(size >> 20):
        digest.update(bytes(1 << 20))
    return digest.hexdigest()


@pytest.mark.parametrize("command", [["verify"], ["slice", "--bits", "4", "-o", "OUT"]])
def test_carried_files_linked_to_one_sparse_file_are_bounded_in_total(tmp_path, command):
    """Eight carried names linked (inside the folder) to one sparse 64 MiB file: a checkpoint of a
    few kB made verify read and hold 512 MiB, and slice write it; the total is refused first."""
    ck = small_checkpoint(tmp_path / "ck")
    sha = _sparse(ck / "zeros.txt", C.CARRY_MAX_BYTES)
    names = [f"side{i}.txt" for i in range(8)]
    for n in names:
        (ck / n).symlink_to("zeros.txt")
    rewrite_manifest(ck, lambda m: m["carried"].update({n: {"bytes": C.CARRY_MAX_BYTES, "sha256": sha} for n in names}))
    r = run(command[0], ck, *[str(tmp_path / "out") if a == "OUT" else a for a in command[1:]])
    _one_line_error(r, "carried files come to", str(C.CARRY_TOTAL_MAX_BYTES))
    assert not (tmp_path / "out").exists()


def test_a_source_folder_whose_side_files_add_up_past_the_limit_is_not_carried(tmp_path):
    src = tmp_path / "src"
    src.mkdir()
    (src / "config.json").write_text("{}")
    _sparse(src / "zeros.txt", C.CARRY_MAX_BYTES)
    for i in range(4):
        (src / f"side{i}.txt").symlink_to("zeros.txt")
    with pytest.raises(WriterError, match="side files .* come to 335544322 bytes in 6 files"):
        mf.CheckpointWriter(tmp_path / "out", carry_from=src)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


# --- hostile model folders and carried configs (issue 24 items 11 and 16) --------------------------
DEEP_OBJECT = '{"a": ' + DEEP + "}"


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    pytest.importorskip("transformers")
    from tiny_models import tiny_hf_model

    root = tmp_path_factory.mktemp("tiny")
    hf = tiny_hf_model("llama", root / "hf")
    assert run("quantize", hf, "-o", root / "ck", "--layers", "linear").exit_code == 0
    text = root / "calib.txt"
    text.write_text("The quick brown fox jumps over the lazy dog, again and again. " * 100)
    return {"hf": hf, "ck": root / "ck", "text": text, "config": json.loads((hf / "config.json").read_text())}


CONFIG_VALUES = {
    "layers as a string": ({"num_hidden_layers": "2"}, "num_hidden_layers is '2': not a whole number"),
    "layers as a float": ({"num_hidden_layers": 2.5}, "num_hidden_layers is 2.5: not a whole number"),
    "negative layers": ({"num_hidden_layers": -1}, "num_hidden_layers is -1: must be at least 0"),
    "a billion layers": ({"num_hidden_layers": 10**9}, "the weights hold 2 numbered block(s)"),
    "a huge vocabulary": ({"vocab_size": 10**30}, "larger than any dimension of the weights"),
    "a negative vocabulary": ({"vocab_size": -5}, "vocab_size is -5: must be at least 1"),
    "zero heads": ({"num_attention_heads": 0}, "num_attention_heads is 0: must be at least 1"),
    "a bool as a width": ({"hidden_size": True}, "hidden_size is True: not a whole number"),
    "architectures of ints": ({"architectures": [5]}, "architectures is [5]: not a list of class names"),
    "a string flag": ({"tie_word_embeddings": "yes"}, "tie_word_embeddings is 'yes': not true or false"),
}
FOLDER_FILES = {
    "deep config.json": ("config.json", DEEP_OBJECT, "nested deeper than 64 levels"),
    "deep index": ("model.safetensors.index.json", '{"weight_map": ' + DEEP + "}", "nested deeper than"),
    "deep tokenizer.json": ("tokenizer.json", DEEP_OBJECT, "nested deeper than 64 levels"),
    "deep tokenizer_config.json": ("tokenizer_config.json", DEEP_OBJECT, "nested deeper than 64 levels"),
    "deep generation_config.json": ("generation_config.json", DEEP_OBJECT, "nested deeper than 64 levels"),
    "config.json not UTF-8": ("config.json", b"{\"a\": \"\xff\"}", "is not UTF-8 text"),
    "config.json a list": ("config.json", "[1, 2]", "is not a JSON object"),
}


def _folder_cases(tiny):
    for what, (values, said) in CONFIG_VALUES.items():
        yield what, "config.json", json.dumps({**tiny["config"], **values}), said
    for what, (name, content, said) in FOLDER_FILES.items():
        yield what, name, content, said


@pytest.mark.parametrize("command", ["quantize", "quantize --calib", "eval"])
def test_hostile_model_folders_are_one_line_errors(tiny, tmp_path, command):
    """Every hostile file of a model folder, against each command that reads one: one line naming
    the file, exit 1, nothing written (they were RecursionError, StrictDataclassFieldValidationError,
    ZeroDivisionError, RuntimeError, TypeError; a billion layers passed 4 GB with --calib)."""
    for what, name, content, said in _folder_cases(tiny):
        hf = tmp_path / what.replace(" ", "-")
        shutil.copytree(tiny["hf"], hf)
        (hf / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        out = tmp_path / "out"
        args = {
            "quantize": ["quantize", hf, "-o", out, "--layers", "linear"],
            "quantize --calib": ["quantize", hf, "-o", out, "--calib", tiny["text"], "--calib-tokens", "64"],
            "eval": ["eval", hf, "--text", tiny["text"], "--ctx", "16", "--max-tokens", "32", f"{tiny['ck']}@4"],
        }[command]
        r = run(*args)
        assert r.exit_code == 1 and r.output.count("\n") == 1, (what, r.output)
        assert "internal error" not in r.output and said in r.output and name in r.output, (what, r.output)
        assert not out.exists(), what


@pytest.mark.parametrize("command", ["convert --to hf", "convert --to gguf", "eval"])
def test_hostile_carried_configs_are_one_line_errors(tiny, tmp_path, command):
    """A checkpoint that carries a hostile config.json (checksums right): convert --to hf and eval
    refuse it in one line, before transformers builds anything."""
    ck = mf.open(tiny["ck"])
    cases = [(w, json.dumps({**tiny["config"], **v}), s) for w, (v, s) in CONFIG_VALUES.items()]
    cases += [("deep config.json", DEEP_OBJECT, "nested deeper than 64 levels")]
    for what, content, said in cases:
        carried = {**ck.carried_bytes(), "config.json": content.encode()}
        hostile = tmp_path / what.replace(" ", "-")
        with mf.CheckpointWriter(
            hostile, carry_from=carried, extensions=ck.manifest.get("extensions"),
            must_understand=ck.manifest.get("must_understand"),
        ) as w:
            for name in ck.tensor_names():
                t = ck.info(name)
                if t.quantized:
                    w.add_quantized(
                        name, ck.codes(name), ck.scale(name), ck.zero(name), dtype=t.dtype,
                        group_size=t.group_size, scheme=t.scheme, scale_dtype=t.scale_dtype,
                        zero_dtype=t.zero_dtype,
                    )
                else:
                    w.add_dense(name, ck.dequantize(name))
        out = tmp_path / "out"
        args = {
            "convert --to hf": ["convert", hostile, "--to", "hf", "--bits", "4", "-o", out],
            "convert --to gguf": ["convert", hostile, "--to", "gguf", "--bits", "4", "-o", out],
            "eval": ["eval", tiny["hf"], "--text", tiny["text"], "--ctx", "16", "--max-tokens", "32", f"{hostile}@4"],
        }[command]
        r = run(*args)
        assert r.exit_code == 1 and r.output.count("\n") == 1, (what, r.output)
        assert "internal error" not in r.output and said in r.output and "config.json" in r.output, (what, r.output)
        assert not out.exists(), what
        assert run("verify", hostile).exit_code == 0, what  # the container itself is sound


# --- text read as far as it is kept (issue 24 item 13), folders of any text (issue 25 item 4) -------
class _CountingTokenizer:
    """One id per word; remembers how many characters it was given."""

    def __init__(self):
        self.chars = 0

    def __call__(self, text, add_special_tokens=False):
        self.chars += len(text)
        return {"input_ids": [len(w) for w in text.split()]}


def test_a_huge_one_line_text_is_read_and_tokenized_only_as_far_as_kept(tmp_path):
    from matq_converters import text as corpus
    from matq_format.errors import MatqError

    big = tmp_path / "one-line.txt"
    big.write_text("lorem ipsum dolor " * 1_000_000)  # 18 MB, no newline
    tok = _CountingTokenizer()
    stream = corpus.tokenize_files(tok, [big], MatqError, 1000)
    assert len(stream.ids) >= 1000
    assert tok.chars <= 2 * corpus.PIECE_BYTES and stream.text_bytes <= 2 * corpus.PIECE_BYTES, tok.chars
    assert stream.sha256 == hashlib.sha256(big.read_bytes()[: stream.text_bytes]).hexdigest()


def test_pieces_tokenize_as_the_whole_text(tiny, tmp_path, monkeypatch):
    """Cut before a space between words, the pieces give the whole text's tokens (byte-level BPE)."""
    from transformers import AutoTokenizer

    from matq_converters import text as corpus
    from matq_format.errors import MatqError

    tok = AutoTokenizer.from_pretrained(tiny["hf"])
    body = (tiny["text"].read_text() + " caf\u00e9  \u4e2d\u6587\u5b57 \n\n\t x" * 30) * 8
    f = tmp_path / "t.txt"
    f.write_text(body)
    monkeypatch.setattr(corpus, "PIECE_BYTES", 997)
    pieces = list(corpus.read_pieces(f, MatqError, 997))
    assert len(pieces) > 20 and "".join(t for _, t in pieces) == body
    whole = tok(body, add_special_tokens=False)["input_ids"]
    assert list(corpus.tokenize_files(tok, [f], MatqError, 10**9).ids) == whole


def test_a_text_folder_is_read_whatever_the_names_binary_files_skipped_and_said_once(tiny, tmp_path):
    from matq_converters.text import SkippedFilesWarning
    from matq_eval.text import load_windows

    docs = tmp_path / "docs"
    (docs / "sub").mkdir(parents=True)
    prose = tiny["text"].read_text()
    (docs / "notes").write_text(prose)
    (docs / "sub" / "guide.py").write_text(prose)
    (docs / "blob.txt").write_bytes(b"abc\0def" * 10)
    (docs / "latin.dat").write_bytes("caf\u00e9 ".encode("latin-1") * 20)
    (docs / ".hidden").write_bytes(b"\0")
    with pytest.warns(SkippedFilesWarning) as said:
        w = load_windows(tiny["hf"], docs, ctx=16, max_tokens=10_000)
    assert [p.name for p in w.files] == ["notes", "guide.py"]
    assert len(said) == 1 and "skipped 2 file(s)" in str(said[0].message)
    assert "blob.txt (is not text (holds NUL bytes))" in str(said[0].message)
    out = tmp_path / "q"
    r = run("quantize", tiny["hf"], "-o", out, "--calib", docs, "--calib-tokens", "64")
    assert r.exit_code == 0, r.output
    assert r.output.count("skipped 2 file(s) that are not text") == 1, r.output
    assert mf.open(out).source["calibration"]["files"] == 1  # 64 tokens: the first file is enough


def test_training_json_that_is_not_json_or_nests_without_end_is_one_line(tmp_path):
    """Training records go through the one bounded JSON parser: a bad line is named by number."""
    from matq_train.data import DataError, read_documents

    (tmp_path / "a.jsonl").write_text('{"text": "one"}\n{"text": \n', encoding="utf-8")
    with pytest.raises(DataError, match=r"a\.jsonl:2"):
        read_documents([tmp_path / "a.jsonl"])
    deep = tmp_path / "b.json"
    deep.write_text("[" * 100_000 + "]" * 100_000, encoding="utf-8")
    with pytest.raises(DataError, match=r"b\.json.*nest"):
        read_documents([deep])


@pytest.mark.parametrize(
    "text, said",
    [(b" " * (2 << 20), "larger than"), (b'{"model": []}', "no model.decoder"), (b"{", "not valid JSON")],
    ids=["huge", "no-decoder", "broken"],
)
def test_an_onnx_folder_whose_genai_config_is_hostile_is_one_line(tmp_path, text, said):
    from matq_eval.onnx import decoder_config
    from matq_format.errors import MatqError

    (tmp_path / "genai_config.json").write_bytes(text)
    with pytest.raises(MatqError, match=f"genai_config.json: .*{said}"):
        decoder_config(tmp_path)
