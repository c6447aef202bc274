"""`matq inspect`, `verify`, `slice`: output, exit codes, one-line errors, no partial output."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner

import matq_format as mf
from matq_cli.main import cli
from matq_format import numerics as N


@pytest.fixture()
def ck(tmp_path):
    rng = np.random.default_rng(1)
    with mf.CheckpointWriter(tmp_path / "ck") as w:
        for i in range(3):
            x = rng.normal(size=(32, 128)).astype(np.float32)
            s, z = N.minmax_params(x, 8, None)
            w.add_quantized(
                f"model.layers.{i}.mlp.up_proj.weight",
                N.quantize(x, s, z, 8, None),
                s,
                z,
                extra_precision=(2,),
            )
        w.add_dense("model.embed_tokens.weight", rng.normal(size=(10, 32)).astype(np.float16))
    return tmp_path / "ck"


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def test_inspect_text_and_json(ck):
    r = run("inspect", ck)
    assert r.exit_code == 0, r.output
    assert "widths served: int8 int7 int6 int5 int4 int3 int2 int1" in r.output and "bits/weight" in r.output
    assert "model.layers.0.mlp.up_proj.weight" not in r.output  # the summary only
    r = run("inspect", ck, "--tensors")
    assert (
        "model.layers.0.mlp.up_proj.weight" in r.output and "int2:" in r.output and "extra bucket" in r.output
    )
    r = run("inspect", ck, "--json")
    d = json.loads(r.output)
    b = d["bytes_per_width"]
    assert b["8"] > b["6"] > b["4"] > b["3"] > b["2"]
    t = next(t for t in d["tensors"] if t["name"] == "model.layers.1.mlp.up_proj.weight")
    ckpt = mf.open(ck)
    q = ckpt.codes(t["name"])
    assert t["extra_bucket_share"]["2"] == N.extra_bucket_share(q, 8, 2)
    assert t["bytes"]["4"] == 5 * (32 * 128 // 8) + 32 * 2 + 32
    assert d["digest"] == ckpt.digest


def test_verify_ok_and_corrupt(ck):
    r = run("verify", ck)
    assert r.exit_code == 0 and "OK" in r.output
    plane = ck / "matq-plane-3.safetensors"
    data = bytearray(plane.read_bytes())
    data[-5] ^= 0x10
    plane.write_bytes(bytes(data))
    r = CliRunner().invoke(cli, ["verify", str(ck)])
    assert r.exit_code == 1
    lines = [ln for ln in r.output.splitlines() if ln]
    assert len(lines) == 1 and "matq-plane-3.safetensors" in lines[0] and "CRC" in lines[0]


def test_slice_cli(ck, tmp_path):
    out = tmp_path / "int4"
    r = run("slice", ck, "--bits", "4", "-o", out)
    assert r.exit_code == 0, r.output
    assert "bits per quantized weight" in r.output
    n_quantized = len(mf.open(ck).quantized_names())
    assert f"widths: int4 x{n_quantized} tensors" in r.output  # the widths it chose, shown
    src, s = mf.open(ck), mf.open(out)
    for n in src.quantized_names():
        assert np.array_equal(s.dequantize(n, 4), src.dequantize(n, 4))
    r = run("slice", ck, "--plan", "increasing", "--extra-precision", "-o", tmp_path / "mnm")
    assert r.exit_code == 0, r.output
    r = CliRunner().invoke(cli, ["slice", str(ck), "-o", str(tmp_path / "x")])
    assert r.exit_code == 2  # usage error: neither --bits nor --plan
    r = CliRunner().invoke(cli, ["slice", str(ck), "--bits", "4", "-o", str(out)])
    assert r.exit_code == 1 and "already exists" in r.output


def test_errors_are_one_line_without_traceback(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x05\x00\x00\x00\x00\x00\x00\x00hello")
    env = {k: v for k, v in os.environ.items() if k != "MATQ_DEBUG"}
    p = subprocess.run(
        [sys.executable, "-m", "matq_cli", "verify", str(bad)], capture_output=True, text=True, env=env
    )
    assert p.returncode == 1
    assert p.stderr.count("\n") == 1 and "Traceback" not in p.stderr and str(bad) in p.stderr
    p = subprocess.run(
        [sys.executable, "-m", "matq_cli", "slice", str(bad), "--bits", "4", "-o", str(tmp_path / "o")],
        capture_output=True,
        text=True,
        env=env,
    )
    assert p.returncode == 1 and not (tmp_path / "o").exists()
    p = subprocess.run(
        [sys.executable, "-m", "matq_cli", "verify", str(bad)],
        capture_output=True,
        text=True,
        env={**env, "MATQ_DEBUG": "1"},
    )
    assert p.returncode == 1 and "Traceback" in p.stderr


# --- issue 10, item 7f: names from a file never reach the terminal raw ------------------------------
EVIL = "model.layers.0.mlp.up\x1b]0;owned\x07\x1b[2J\r\nfake line\u202e.weight"
"""Escape sequences (set the title, clear the screen), a line break, a bidi override."""


def test_control_characters_in_names_are_escaped(tmp_path):
    from matq_format.errors import MatqError, WriterError, printable

    rng = np.random.default_rng(0)
    x = rng.normal(size=(4, 64)).astype(np.float32)
    s, z = N.minmax_params(x, 8, None)
    with mf.CheckpointWriter(tmp_path / "ck") as w:
        w.add_quantized(EVIL, N.quantize(x, s, z, 8, None), s, z)
        w.add_dense(EVIL + ".bias", np.zeros(4, np.float32))
    shown = "model.layers.0.mlp.up\\x1b]0;owned\\x07\\x1b[2J\\r\\nfake line\\u202e.weight"
    assert printable(EVIL) == shown and printable("plain ü €") == "plain ü €"

    r = run("inspect", tmp_path / "ck", "--tensors")
    assert r.exit_code == 0, r.output
    assert "\x1b" not in r.output and "\r" not in r.output and "\u202e" not in r.output
    assert f"  {shown}  from F32 [4x64]" in r.output and f"  {shown}.bias  dense F32 [4]" in r.output
    r = run("inspect", tmp_path / "ck", "--json")  # JSON stays exact
    assert [t["name"] for t in json.loads(r.output)["tensors"]] == [EVIL, EVIL + ".bias"]

    # Errors that name a tensor: the library's message is one printable line; .message keeps it as is.
    err = WriterError(tmp_path, f"{EVIL}: bad")
    assert str(err) == f"{tmp_path}: {shown}: bad" and err.message == f"{EVIL}: bad"
    assert isinstance(err, MatqError)
    plan = tmp_path / "plan.json"
    plan.write_text(json.dumps({"patterns": {"up": 9}}))
    r = CliRunner().invoke(cli, ["slice", str(tmp_path / "ck"), "--plan", str(plan), "-o", str(tmp_path / "s")])
    assert r.exit_code == 1
    assert r.output == f"matq: {tmp_path / 'ck' / 'matq.safetensors'}: {shown}: width 9 outside 1..8\n"


def test_inspect_lists_only_the_widths_a_slice_serves(ck, tmp_path):
    """An int4 slice serves int4 down to int1, not int8 or int6 (which `slice --bits 8` would refuse)."""
    mf.slice_checkpoint(mf.open(ck), tmp_path / "s4", bits=4)
    r = run("inspect", tmp_path / "s4")
    assert r.exit_code == 0, r.output
    assert "widths served: int4 int3 int2 int1\n" in r.output and "int8" not in r.output.split("digest")[1]
    d = json.loads(run("inspect", tmp_path / "s4", "--json").output)
    assert d["widths_served"] == [4, 3, 2, 1] and list(d["bytes_per_width"]) == ["4", "3", "2", "1"]
    b = d["bytes_per_width"]
    assert b["4"] > b["3"] > b["2"]
    s = d["summary"]
    assert s["quantized_tensors"] == len(mf.open(ck).quantized_names()) and not s["mixed_widths"]
    assert s["bits_per_weight"]["4"] == 8 * b["4"] / s["weights"]


def test_inspect_names_the_model_by_its_architecture_folder_and_config(tmp_path):
    """`model:` says where the checkpoint came from: not `model (bert)` for a source folder named model."""
    src = tmp_path / "model"
    src.mkdir()
    (src / "config.json").write_text(json.dumps({"model_type": "bert", "_name_or_path": "org/MiniLM"}))
    x = np.random.default_rng(0).normal(size=(8, 64)).astype(np.float32)
    s, z = N.minmax_params(x, 8, None)
    source = {"model": "model", "architecture": "bert"}
    with mf.CheckpointWriter(tmp_path / "minilm-matq", carry_from=src, source=source) as w:
        w.add_quantized("encoder.layer.0.intermediate.dense.weight", N.quantize(x, s, z, 8, None), s, z)
    r = run("inspect", tmp_path / "minilm-matq")
    assert "model: bert, from the folder model (config.json: org/MiniLM)\n" in r.output, r.output
    with mf.CheckpointWriter(tmp_path / "bare") as w:
        w.add_quantized("w", N.quantize(x, s, z, 8, None), s, z)
    assert "model: unknown architecture, checkpoint bare\n" in run("inspect", tmp_path / "bare").output
