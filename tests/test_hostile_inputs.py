"""Hostile or malformed inputs end in one line and exit 1, never "internal error" (issue 24)."""

from __future__ import annotations

import json

import numpy as np
import pytest
from test_output_safety import run, small_checkpoint

import matq_format as mf

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
