"""Progress: the library's steps reach the CLI's listener; a log hears only of long steps, with a
line when one has run LOG_AFTER seconds and one when it ends; a bar's ETA ignores a silent start."""

from __future__ import annotations

import io
import time

import pytest

from matq_cli import progress as P
from matq_format import progress


def test_steps_are_silent_without_a_listener():
    with progress.stage("nothing listens", total=3) as advance:
        advance(1)


def test_a_log_hears_of_long_steps_only(monkeypatch, capsys):
    monkeypatch.setenv("MATQ_PROGRESS", "log")
    monkeypatch.setattr(P, "LOG_AFTER", 0.05)
    with progress.listening(P.listener):
        with progress.stage("quick", total=2, unit="tensor") as advance:
            advance(2)
        with progress.stage("slow", total=4, unit="tensor") as advance:
            advance(1)
            time.sleep(0.3)
            advance(3)
        with progress.stage("uncounted") as advance:
            time.sleep(0.3)
        with progress.stage("bytes", total=2048, unit="B") as advance:
            time.sleep(0.3)
            advance(2048)
    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == "matq: slow: 1 of 4 tensors after 0.05 s ..."
    assert lines[1].startswith("matq: slow: done, 4 tensors, 0.")
    assert lines[2] == "matq: uncounted: running for 0.05 s ..."
    assert lines[3].startswith("matq: uncounted: done, 0.")
    assert lines[4] == "matq: bytes: 0 of 2048 B after 0.05 s ..."  # a symbol takes no plural
    assert lines[5].startswith("matq: bytes: done, 2048 B, 0.") and len(lines) == 6


@pytest.mark.parametrize("silence", [0.0, 0.4])
def test_the_eta_counts_from_the_first_unit(silence):
    pb = P._Bar(total=100, desc="x", disable=False, file=io.StringIO())
    time.sleep(silence)  # a graph export before the first tensor
    pb.update(1)
    time.sleep(0.05)
    pb.update(9)
    rate = pb.format_dict["rate"]  # 9 units in ~0.05 s, whatever came before
    assert rate > 50, rate
    pb.close()


@pytest.mark.parametrize("how", ["log", "off", "bar"])
def test_every_mode_has_what_the_commands_use(monkeypatch, how):
    """update, n, total, refresh and close (eval sets n and refreshes; quantize sets total)."""
    monkeypatch.setenv("MATQ_PROGRESS", how)
    with P.bar(None, "x", "window", file=io.StringIO()) if how == "bar" else P.bar(None, "x") as pb:
        pb.total = 4
        pb.update(1)
        pb.n = 3
        pb.refresh()
        assert (pb.n, pb.total) == (3, 4)


def test_an_uncounted_step_redraws_its_elapsed_time():
    """tqdm draws on updates only; a step with none (a graph export) ticks, or its bar would never show."""
    import io

    f = io.StringIO()
    pb = P._Bar(total=None, desc="export", bar_format="{desc}: {elapsed}", delay=0.05, file=f)
    pb.tick(every=0.05)
    time.sleep(0.4)
    pb.close()
    assert f.getvalue().count("export: 00:00") >= 3, f.getvalue()


# --- calibration's layers ----
class _Log(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_a_line_per_layer_with_an_eta_that_leaves_out_the_first_layer():
    log = _Log()
    pb = P.bar(None, "calibrate", "layer")
    clock = iter([100.0, 110.0, 120.0])  # setup + layer 1: 100 s; then 10 s per layer
    ll = P.LayerLog(pb, "calibrate", log)
    ll.clock = lambda: next(clock)
    ll.t0 = ll.last = 0.0
    for done in (1, 2, 3):
        ll(done, 5)
    lines = log.getvalue().splitlines()
    assert lines == [
        "calibrate: layer 1/5 in 100.0 s, 1:40 elapsed, ETA 6:40",
        "calibrate: layer 2/5 in 10.0 s, 1:50 elapsed, ETA 0:30",
        "calibrate: layer 3/5 in 10.0 s, 2:00 elapsed, ETA 0:20",
    ]
    pb.close()
