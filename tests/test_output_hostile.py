"""Outputs against a hostile or careless folder (issue 24): matq creates, truncates, renames or
deletes only what it can prove it made.

A planted lock file (a link, a hard link, someone's file), entries that merely look like leftovers,
``--force`` over a folder holding files its record does not list, a FIFO where a recogniser reads,
scratch folders of killed runs, and names too long for the temporary siblings.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
from test_output_safety import digest, leftovers, run, small_checkpoint

import matq_format as mf
from matq_format.publish import OutputKindError, foreign_entries, scratch_dir

pytestmark = pytest.mark.slow


def dead_pid() -> int:
    """The process id of a process that has exited."""
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.fixture
def ck(tmp_path) -> Path:
    return small_checkpoint(tmp_path / "ck")


# --- 1: the lock file ---------------------------------------------------------------------------
@pytest.mark.parametrize("how", ["symlink to the input", "dangling symlink", "hard link", "foreign file"])
def test_a_planted_lock_file_is_refused_not_written(ck, tmp_path, how):
    lock = tmp_path / ".out.matq-lock"
    victim = ck / "matq.safetensors"
    if how == "symlink to the input":
        lock.symlink_to(victim)
    elif how == "dangling symlink":
        victim = tmp_path / "created-through-the-link"
        lock.symlink_to(victim)
    elif how == "hard link":
        victim = tmp_path / "precious.txt"
        victim.write_text("12\n")  # looks like a pid, but it has a second name
        os.link(victim, lock)
    else:
        lock.write_text("my notes, not a process id\n")
        victim = lock
    before = digest(ck) | (digest(victim) if victim.exists() else {})
    r = run("slice", ck, "--bits", "4", "-o", tmp_path / "out")
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "lock file" in r.output, r.output
    assert digest(ck) | (digest(victim) if victim.exists() else {}) == before
    assert not (tmp_path / "out").exists()
    if how == "dangling symlink":
        assert not victim.exists()


def test_a_stale_lock_file_of_matq_is_reused(ck, tmp_path):
    (tmp_path / ".out.matq-lock").write_text(f"{dead_pid()}\n")  # a killed run's, as it leaves it
    r = run("slice", ck, "--bits", "4", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert not leftovers(tmp_path)


# --- 2: what looks like a leftover ---------------------------------------------------------------
def test_entries_that_only_look_like_leftovers_are_kept(ck, tmp_path):
    notes = tmp_path / ".out.partial-notes"
    notes.write_text("mine")
    backup = tmp_path / ".out.old-backup"
    small_checkpoint(backup, seed=3)
    alive = tmp_path / f".out.partial-{os.getpid()}-abcd1234"  # a live process's: not ours to remove
    alive.write_text("in use")
    before = digest(notes, backup, alive)
    r = run("slice", ck, "--bits", "4", "-o", tmp_path / "out")
    assert r.exit_code == 0, r.output
    assert digest(notes, backup, alive) == before
    assert mf.open(tmp_path / "out").tensor_names() == mf.open(ck).tensor_names()  # not the backup


def test_a_dead_runs_partial_is_removed(ck, tmp_path):
    partial = tmp_path / f".out.partial-{dead_pid()}-abcd1234"
    partial.mkdir()
    (partial / "matq.safetensors").write_bytes(b"half")
    assert run("slice", ck, "--bits", "4", "-o", tmp_path / "out").exit_code == 0
    assert not partial.exists()


# --- 3: --force and entries the output does not list ----------------------------------------------
def test_force_refuses_a_work_folder_that_holds_a_checkpoint_file(ck, tmp_path):
    work = tmp_path / "work"
    (work / "src").mkdir(parents=True)
    (work / "src" / "train.py").write_text("print('hi')\n")
    (work / "data").mkdir()
    for f in ck.iterdir():
        (work / f.name).write_bytes(f.read_bytes())  # a checkpoint copied into the work folder
    before = digest(work)
    r = run("slice", ck, "--bits", "4", "-o", work, "--force")
    assert r.exit_code == 1 and r.output.count("\n") == 1, r.output
    assert "data/" in r.output and "src/" in r.output
    assert digest(work) == before and sorted(os.listdir(work)) == sorted(["src", "data", *os.listdir(ck)])


def test_force_keeps_files_a_user_added_to_a_checkpoint(ck, tmp_path):
    out = tmp_path / "out"
    assert run("slice", ck, "--bits", "4", "-o", out).exit_code == 0
    (out / "README.md").write_text("my notes")
    (out / "exports").mkdir()
    (out / "exports" / "m.gguf").write_bytes(b"GGUF")
    before = digest(out)
    r = run("slice", ck, "--bits", "2", "-o", out, "--force")
    assert r.exit_code == 1 and "README.md" in r.output and "exports/" in r.output, r.output
    assert digest(out) == before
    (out / "README.md").unlink()
    (out / "exports" / "m.gguf").unlink()
    (out / "exports").rmdir()
    assert run("slice", ck, "--bits", "2", "-o", out, "--force").exit_code == 0


def test_foreign_entries_walks_listed_folders_only(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "tok.json").write_text("{}")
    (tmp_path / "sub" / "extra.txt").write_text("x")
    (tmp_path / "a.txt").write_text("x")
    (tmp_path / "link").symlink_to(tmp_path / "a.txt")
    assert foreign_entries(tmp_path, ["a.txt", "sub/tok.json", "link"]) == ["link", "sub/extra.txt"]
    assert foreign_entries(tmp_path, ["a.txt", "sub/tok.json", "sub/extra.txt"]) == ["link"]


def test_a_folder_without_a_record_is_never_replaced(tmp_path):
    from matq_format.publish import AtomicOutput, OutputKind

    out = tmp_path / "o"
    out.mkdir()
    (out / "f").write_text("x")
    kind = OutputKind("thing", True, lambda p: True, lambda p: None)
    with pytest.raises(OutputKindError, match="records no list of its files"):
        AtomicOutput(out, kind, overwrite=True).open()
    assert (out / "f").read_text() == "x"


# --- 9: a FIFO where a recogniser reads -----------------------------------------------------------
RECOGNIZE = """
import sys
from pathlib import Path
from matq_converters.exporters.hf.export import is_hf_export
from matq_converters.exporters.onnx.export import is_onnx_export
print({"hf": is_hf_export, "onnx": is_onnx_export}[sys.argv[1]](Path(sys.argv[2])))
"""


@pytest.mark.parametrize(("target", "fifo"), [("hf", "model.safetensors.index.json"), ("onnx", "model.onnx")])
def test_recognising_an_export_never_waits_on_a_fifo(tmp_path, target, fifo):
    (tmp_path / "config.json").write_text("{}")
    os.mkfifo(tmp_path / fifo)
    p = subprocess.run(
        [sys.executable, "-c", RECOGNIZE, target, str(tmp_path)], capture_output=True, text=True, timeout=120
    )
    assert p.stdout.strip() == "False", p.stdout + p.stderr


# --- 18: scratch folders of killed runs ----------------------------------------------------------
def test_scratch_folders_of_dead_runs_are_removed(tmp_path, monkeypatch):
    monkeypatch.setattr(tempfile, "tempdir", str(tmp_path))
    dead = tmp_path / f"matq-carried-{dead_pid()}-abcd1234"
    dead.mkdir()
    (dead / "tokenizer.json").write_text("{}")
    live = tmp_path / f"matq-carried-{os.getpid()}-abcd1234"
    live.mkdir()
    mine = tmp_path / "matq-carried-notes"
    mine.mkdir()
    with scratch_dir("carried") as tmp:
        assert tmp.parent == tmp_path and tmp.name.startswith(f"matq-carried-{os.getpid()}-")
        assert not dead.exists() and live.exists() and mine.exists()
    assert not tmp.exists()


def test_a_killed_trainer_save_is_removed_by_the_next(tmp_path):
    from matq_train.config import STATE_FILE, TrainConfig, checkpoint_folder

    cfg = TrainConfig(model_dir=str(tmp_path / "model"), data=[str(tmp_path / "text")])
    ckdir = tmp_path / "ckpt"
    ckdir.mkdir()
    partial = ckdir / f".step-2.partial-{dead_pid()}-abcd1234"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(b"half")
    with checkpoint_folder(ckdir, 2, cfg) as tmp:
        (tmp / "model.safetensors").write_bytes(b"whole")
        (tmp / "optimizer.safetensors").write_bytes(b"whole")
    assert sorted(os.listdir(ckdir)) == ["step-2"]
    assert json.loads((ckdir / "step-2" / STATE_FILE).read_text())["step"] == 2


# --- 5: trainer checkpoints and the inputs ---------------------------------------------------------
def test_checkpoint_dir_inside_an_input_is_refused(tmp_path):
    from matq_format.publish import OutputOverlapError
    from matq_train.config import TrainConfig

    model = tmp_path / "model"
    model.mkdir()
    cfg = TrainConfig(model_dir=str(model), data=[str(tmp_path / "text")], checkpoint_dir=str(model))
    with pytest.raises(OutputOverlapError):
        cfg.check()


def test_a_step_folder_holding_user_files_is_not_replaced(tmp_path):
    from matq_train.config import TrainConfig, checkpoint_folder

    cfg = TrainConfig(model_dir=str(tmp_path / "model"), data=[str(tmp_path / "text")])
    step = tmp_path / "ckpt" / "step-1"
    with checkpoint_folder(step.parent, 1, cfg) as tmp:
        (tmp / "model.safetensors").write_bytes(b"1")
    (step / "notes.txt").write_text("what I saw at step 1")
    with pytest.raises(OutputKindError, match=r"notes\.txt"):
        with checkpoint_folder(step.parent, 1, cfg) as tmp:
            (tmp / "model.safetensors").write_bytes(b"2")
    assert (step / "notes.txt").read_text() == "what I saw at step 1"
    assert (step / "model.safetensors").read_bytes() == b"1"


# --- 19: names too long for their temporary siblings ------------------------------------------------
@pytest.mark.parametrize("single", [False, True])
def test_a_name_too_long_is_refused_up_front(ck, tmp_path, single):
    out = tmp_path / ("n" * 240)
    r = run("slice", ck, "--bits", "4", "-o", out, *(["--single-file"] if single else []))
    assert r.exit_code == 1 and r.output.count("\n") == 1 and "name is 240 bytes" in r.output, r.output
    assert sorted(os.listdir(tmp_path)) == ["ck"]
