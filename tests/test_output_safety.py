"""Nothing lost, nothing leaked: outputs never touch inputs, links never leak, runs never race.

Each test reproduces a way a careless or hostile invocation used to lose or leak data (issue 10):
``--force`` over inputs and unrelated folders, links out of a model folder, FIFOs and
``/dev/zero`` as carried files, carried files edited after writing, two runs to one output, runs
killed with ``kill -9``. The fuzz-style test runs every writing command with outputs at, inside
and around its inputs and checks that no input byte changes.
"""

from __future__ import annotations

import hashlib
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

import matq_format as mf
from matq_cli.main import cli
from matq_format import numerics as N
from matq_format.errors import ChecksumError
from matq_format.publish import (
    AtomicOutput,
    OutputBusyError,
    OutputExistsError,
    OutputKindError,
    OutputOverlapError,
    OutputRaceError,
)
from matq_format.safefs import RefusedFileError
from matq_format.writer import checkpoint_kind

pytestmark = pytest.mark.slow


def run(*args):
    return CliRunner().invoke(cli, [str(a) for a in args])


def digest(*roots: Path) -> dict[str, str]:
    """sha256 of every file under ``roots`` (links followed), by path: what must not change."""
    out = {}
    for root in roots:
        files = [root] if root.is_file() else sorted(p for p in root.rglob("*") if p.is_file())
        for p in files:
            out[str(p)] = hashlib.sha256(p.read_bytes()).hexdigest()
    return out


def leftovers(*folders: Path) -> list[str]:
    return [
        p.name
        for f in folders
        if f.is_dir()
        for p in f.iterdir()
        if ".partial-" in p.name or ".old-" in p.name or p.name.endswith(".matq-lock")
    ]


def small_checkpoint(out: Path, carry: Path | None = None, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    with mf.CheckpointWriter(out, carry_from=carry) as w:
        x = rng.normal(size=(16, 128)).astype(np.float32)
        s, z = N.minmax_params(x, 8, None)
        w.add_quantized("model.layers.0.mlp.up_proj.weight", N.quantize(x, s, z, 8, None), s, z)
        w.add_dense("model.norm.weight", np.ones(16, np.float32))
    return out


@pytest.fixture(scope="module")
def world(tmp_path_factory):
    """A tiny Llama (with tokenizer), its matq checkpoint, and a MatGPTQ folder, each in a folder of
    its own beside an unrelated file."""
    pytest.importorskip("transformers")
    from test_matgptq import _float_model, _pack_matgptq
    from tiny_models import tiny_hf_model

    root = tmp_path_factory.mktemp("world")
    hf = tiny_hf_model("llama", root / "hfp" / "hf")
    ck = root / "ckp" / "ck"
    assert run("quantize", hf, "-o", ck, "--layers", "linear").exit_code == 0
    mg = root / "mgp" / "mg"
    mg.parent.mkdir()
    _pack_matgptq(_float_model(root / "float"), mg, "F16")
    for parent in (hf.parent, ck.parent, mg.parent):
        (parent / "other.txt").write_text("not matq's")
    return {"hf": hf, "ck": ck, "mg": mg}


WRITERS = {
    "quantize": ("hf", lambda i, o: ["quantize", i, "-o", o, "--layers", "linear"]),
    "import-matgptq": ("mg", lambda i, o: ["import-matgptq", i, "-o", o]),
    "slice": ("ck", lambda i, o: ["slice", i, "--bits", "4", "-o", o]),
    "slice-single-file": ("ck", lambda i, o: ["slice", i, "--bits", "4", "--single-file", "-o", o]),
    "convert-gguf": ("ck", lambda i, o: ["convert", i, "--to", "gguf", "--bits", "4", "-o", o]),
}


def around(inp: Path, tmp: Path) -> dict[str, Path]:
    """Outputs at, inside and around an input folder, directly and through links."""
    first = sorted(p for p in inp.iterdir() if p.is_file())[0]
    links = tmp / "links"
    links.mkdir(exist_ok=True)
    for name, target in (("to-input", inp), ("to-parent", inp.parent), ("to-file", first)):
        (links / name).unlink(missing_ok=True)
        (links / name).symlink_to(target)
    return {
        "the input": inp,
        "a new folder inside": inp / "sub",
        "a file inside": first,
        "the parent": inp.parent,
        "the parent's file": inp.parent / "other.txt",
        "a link to the input": links / "to-input",
        "inside a link to the input": links / "to-input" / "new",
        "a link to the parent": links / "to-parent",
        "a link to a file inside": links / "to-file",
    }


@pytest.mark.parametrize("command", WRITERS)
def test_no_output_at_inside_or_around_an_input_changes_a_byte(world, tmp_path, command):
    key, argv = WRITERS[command]
    inp = world[key]
    before = digest(inp.parent)
    for where, out in around(inp, tmp_path).items():
        for force in ((), ("--force",)):
            r = run(*argv(inp, out), *force)
            assert r.exit_code == 1, f"{command} -o {where} {force}: exit {r.exit_code}\n{r.output}"
            line = r.output.strip()
            assert line.startswith("matq: ") and "\n" not in line and "Traceback" not in line, line
            assert digest(inp.parent) == before, f"{command} -o {where} {force} changed an input"
            assert not leftovers(inp.parent, inp, tmp_path / "links"), (command, where)
    # A fresh output beside the input works, and --force replaces what the command itself wrote.
    out = tmp_path / ("fresh.gguf" if "gguf" in command else "fresh")
    assert run(*argv(inp, out)).exit_code == 0
    assert run(*argv(inp, out), "--force").exit_code == 0
    assert digest(inp.parent) == before
    assert not leftovers(tmp_path)


@pytest.mark.parametrize("command", ["quantize", "slice", "convert-gguf"])
def test_force_never_replaces_an_unrelated_folder_or_file(world, tmp_path, command):
    key, argv = WRITERS[command]
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "thesis.tex").write_text("years of work")
    lone = tmp_path / "notes.txt"
    lone.write_text("keep me")
    other_kind = small_checkpoint(tmp_path / "a-checkpoint") if command == "convert-gguf" else None
    before = digest(tmp_path)
    for out in filter(None, (mine, lone, other_kind)):
        r = run(*argv(world[key], out), "--force")
        assert r.exit_code == 1 and "refusing to replace it" in r.output, r.output
    assert digest(tmp_path) == before


def test_exists_message_names_the_flag(world, tmp_path):
    out = small_checkpoint(tmp_path / "ck")
    r = run("slice", world["ck"], "--bits", "4", "-o", out)
    assert r.exit_code == 1 and r.output.strip() == f"matq: {out}: already exists (use --force to replace it)"
    with pytest.raises(OutputExistsError, match="already exists$"):  # the library names no flag
        mf.slice_checkpoint(world["ck"], out, bits=4)


# --- links, FIFOs, devices ------------------------------------------------------------------------
def _hf_copy(world, tmp_path: Path) -> Path:
    dst = tmp_path / "model"
    shutil.copytree(world["hf"], dst)
    return dst


def test_link_out_of_the_model_folder_is_refused(world, tmp_path):
    secret = tmp_path / "id_rsa"
    secret.write_text("-----BEGIN PRIVATE KEY-----")
    model = _hf_copy(world, tmp_path)
    (model / "tokenizer.json").unlink()
    (model / "tokenizer.json").symlink_to(secret)
    r = run("quantize", model, "-o", tmp_path / "q")
    assert r.exit_code == 1 and "outside the model folder" in r.output and "tokenizer.json" in r.output
    assert not (tmp_path / "q").exists() and not leftovers(tmp_path)
    # The same for a weight shard linked out of the folder.
    (model / "tokenizer.json").unlink()
    shard = sorted(model.glob("*.safetensors"))[0]
    shard.rename(tmp_path / shard.name)
    shard.symlink_to(tmp_path / shard.name)
    with pytest.raises(RefusedFileError, match="outside the model folder"):
        mf_quantize(model, tmp_path / "q")


def mf_quantize(src, out, **kw):
    from matq_converters.importers.hf.quantize import quantize_hf

    return quantize_hf(src, out, **kw)


def test_hugging_face_cache_snapshot_links_are_followed(world, tmp_path):
    """A cache snapshot's files are links to ../../blobs/<hash>: those are the folder's own files."""
    repo = tmp_path / "hub" / "models--me--tiny"
    snap = repo / "snapshots" / "0123abcd"
    (repo / "blobs").mkdir(parents=True)
    snap.mkdir(parents=True)
    for p in sorted(world["hf"].iterdir()):
        blob = repo / "blobs" / hashlib.sha256(p.read_bytes()).hexdigest()
        shutil.copyfile(p, blob)
        (snap / p.name).symlink_to(os.path.relpath(blob, snap))
    out = mf_quantize(snap, tmp_path / "q", layers="linear")
    ck = mf.open(out)
    assert (out / "tokenizer.json").read_bytes() == (world["hf"] / "tokenizer.json").read_bytes()
    assert not (out / "tokenizer.json").is_symlink()
    ck.verify()
    with pytest.raises(OutputOverlapError):  # the blobs are an input too
        mf_quantize(snap, repo / "blobs" / "q")


def test_fifo_and_device_as_carried_files_are_refused_without_waiting(world, tmp_path):
    model = _hf_copy(world, tmp_path)
    (model / "tokenizer_config.json").unlink()
    os.mkfifo(model / "tokenizer_config.json")
    signal.alarm(60)  # a regression would block on the FIFO: fail the test instead of hanging
    try:
        with pytest.raises(RefusedFileError, match="FIFO"):
            mf_quantize(model, tmp_path / "q")
        ck = tmp_path / "ck"
        shutil.copytree(world["ck"], ck)
        (ck / "config.json").unlink()
        (ck / "config.json").symlink_to("/dev/zero")
        for argv in (
            ["slice", ck, "--bits", "4", "-o", tmp_path / "s"],
            ["convert", ck, "--to", "gguf", "--bits", "4", "-o", tmp_path / "s.gguf"],
        ):
            r = run(*argv)
            assert r.exit_code == 1 and "config.json" in r.output, r.output
        (ck / "config.json").unlink()
        os.mkfifo(ck / "config.json")
        r = run("convert", ck, "--to", "gguf", "--bits", "4", "-o", tmp_path / "s.gguf")
        assert r.exit_code == 1 and "FIFO" in r.output
        os.mkfifo(tmp_path / "pipe")
        r = run("inspect", tmp_path / "pipe")
        assert r.exit_code == 1 and "FIFO" in r.output
    finally:
        signal.alarm(0)
    assert not (tmp_path / "q").exists() and not (tmp_path / "s").exists()
    assert not (tmp_path / "s.gguf").exists() and not leftovers(tmp_path)


# --- carried files are checked whenever they are read --------------------------------------------
def test_edited_carried_files_are_refused_not_laundered(world, tmp_path):
    ck = tmp_path / "ck"
    shutil.copytree(world["ck"], ck)
    tok = ck / "tokenizer.json"
    data = tok.read_bytes()
    i = data.index(b'"vocab"')
    tok.write_bytes(data[:i] + b'"vocaB"' + data[i + 7 :])  # same size, other bytes
    for argv in (
        ["slice", ck, "--bits", "4", "-o", tmp_path / "s"],
        ["convert", ck, "--to", "gguf", "--bits", "4", "-o", tmp_path / "s.gguf"],
        ["verify", ck],
    ):
        r = run(*argv)
        assert r.exit_code == 1 and "tokenizer.json" in r.output and "sha256" in r.output, r.output
    assert not (tmp_path / "s").exists() and not (tmp_path / "s.gguf").exists()
    with pytest.raises(ChecksumError):
        mf.slice_checkpoint(ck, tmp_path / "s", bits=4)


def test_inspect_says_which_checksums_it_checked(world):
    r = run("inspect", world["ck"], "--no-stats")
    assert r.exit_code == 0
    assert "checksums: 0 of " in r.output and "matq verify" in r.output
    d = mf.inspect.describe(mf.open(world["ck"]), stats=True)
    assert 0 < d["checksums"]["checked"] < d["checksums"]["entries"]


# --- two runs, one output -------------------------------------------------------------------------
def test_second_run_to_the_same_output_fails_at_once(world, tmp_path):
    out = tmp_path / "out"
    with AtomicOutput(out, checkpoint_kind(False)):
        r = run("slice", world["ck"], "--bits", "4", "-o", out)
        assert r.exit_code == 1 and "another matq run" in r.output and f"pid {os.getpid()}" in r.output
        with pytest.raises(OutputBusyError):
            mf.slice_checkpoint(world["ck"], out, bits=4, overwrite=True)
    assert not out.exists() and not leftovers(tmp_path)
    mf.slice_checkpoint(world["ck"], out, bits=4)  # the lock went with the first run


def test_output_that_appears_meanwhile_is_not_overwritten(world, tmp_path):
    out = tmp_path / "out"
    w = mf.CheckpointWriter(out)
    w.add_dense("a", np.zeros(3, np.float32))
    small_checkpoint(tmp_path / "elsewhere")
    os.rename(tmp_path / "elsewhere", out)  # another tool published here while we wrote
    before = digest(out)
    with pytest.raises(OutputRaceError, match="appeared while this run was writing"):
        w.close()
    assert digest(out) == before and not leftovers(tmp_path)


# --- killed runs ------------------------------------------------------------------------------------
KILLED_WRITER = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    import matq_format as mf
    w = mf.CheckpointWriter(sys.argv[1], overwrite=True)
    w.add_dense("big", np.zeros(1 << 20, np.float32))
    os.kill(os.getpid(), signal.SIGKILL)
    """
)


def test_partial_output_of_a_killed_run_is_removed_by_the_next(tmp_path):
    out = tmp_path / "out"
    p = subprocess.run([sys.executable, "-c", KILLED_WRITER, str(out)], capture_output=True)
    assert p.returncode == -signal.SIGKILL
    stale = [n for n in os.listdir(tmp_path) if n.startswith(".out.partial-")]
    assert stale and not out.exists()
    small_checkpoint(out)
    assert sorted(os.listdir(tmp_path)) == ["out"]


KILLED_BETWEEN_RENAMES = textwrap.dedent(
    """
    import os, signal, sys
    import numpy as np
    import matq_format as mf
    import matq_format.publish as pub
    pub._libc_renameat2 = None  # the fallback: old output aside, then the new one in
    real_rename = os.rename
    def rename(src, dst):
        real_rename(src, dst)
        if ".old-" in str(dst):
            os.kill(os.getpid(), signal.SIGKILL)
    pub.os.rename = rename
    with mf.CheckpointWriter(sys.argv[1], overwrite=True) as w:
        w.add_dense("new", np.arange(4, dtype=np.float32))
    """
)


def test_replacement_killed_between_its_renames_is_recovered(tmp_path, monkeypatch):
    """Where renameat2 is missing the old output is moved aside first; a kill right then leaves it
    only under .OUT.old-*, and the next run puts it back before anything else."""
    out = small_checkpoint(tmp_path / "out", seed=1)
    before = digest(out)
    p = subprocess.run([sys.executable, "-c", KILLED_BETWEEN_RENAMES, str(out)], capture_output=True)
    assert p.returncode == -signal.SIGKILL, p.stderr
    assert not out.exists() and [n for n in os.listdir(tmp_path) if ".out.old-" in n]
    with pytest.raises(OutputExistsError):  # the next run restores it, then refuses to replace it
        mf.CheckpointWriter(out)
    assert digest(out) == before and sorted(os.listdir(tmp_path)) == ["out"]
    import matq_format.publish as pub

    monkeypatch.setattr(pub, "_libc_renameat2", None)
    small_checkpoint_force(out)  # and the fallback path replaces it when asked
    assert digest(out) != before and sorted(os.listdir(tmp_path)) == ["out"]


def small_checkpoint_force(out: Path) -> None:
    with mf.CheckpointWriter(out, overwrite=True) as w:
        w.add_dense("new", np.arange(4, dtype=np.float32))


def test_force_swaps_in_one_step(tmp_path):
    """With renameat2 the old checkpoint is exchanged for the new one: no moment without OUT."""
    out = small_checkpoint(tmp_path / "out")
    small_checkpoint_force(out)
    assert mf.open(out).tensor_names() == ["new"] and sorted(os.listdir(tmp_path)) == ["out"]
    with pytest.raises(OutputKindError):  # a link is never replaced, whatever it points at
        (tmp_path / "link").symlink_to(out)
        small_checkpoint_force(tmp_path / "link")


def test_disk_full_names_the_output(world, tmp_path, monkeypatch):
    import errno

    from matq_format.container import SafetensorsWriter

    def full(self, *a, **kw):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(SafetensorsWriter, "write", full)
    out = tmp_path / "s"
    r = run("slice", world["ck"], "--bits", "4", "-o", out)
    assert r.exit_code == 1
    assert r.output.startswith(f"matq: {out}: cannot write: No space left on device; temporary files go")
    assert "TMPDIR" in r.output and not leftovers(tmp_path) and not out.exists()


def test_failed_run_removes_the_folders_it_made_and_only_those(tmp_path):
    """``-o a/b/out`` makes a/ and a/b/; a run that fails takes them away again, but never a folder
    that was there before or that holds something else by then."""

    class Boom(Exception):
        pass

    (tmp_path / "kept").mkdir()
    with pytest.raises(Boom), mf.CheckpointWriter(tmp_path / "kept" / "a" / "b" / "out") as w:
        w.add_dense("x", np.zeros(4, np.float32))
        raise Boom
    assert sorted(os.listdir(tmp_path)) == ["kept"] and os.listdir(tmp_path / "kept") == []
    with pytest.raises(Boom), AtomicOutput(tmp_path / "a" / "b" / "out", checkpoint_kind(False)) as o:
        (tmp_path / "a" / "other").write_text("someone else's")
        o.tmp.joinpath("f").write_text("partial")
        raise Boom
    assert sorted(os.listdir(tmp_path / "a")) == ["other"]  # b/ went, a/ stays: it is not empty
    small_checkpoint(tmp_path / "c" / "d" / "out")
    assert (tmp_path / "c" / "d" / "out").is_dir()
