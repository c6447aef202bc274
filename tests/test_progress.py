"""Progress of jobs counted in layers: a line per layer with the ETA when stderr is a log."""

from __future__ import annotations

import io

from matq_cli.progress import LayerLog, bar


class _Log(io.StringIO):
    def isatty(self) -> bool:
        return False


def test_a_line_per_layer_with_an_eta_that_leaves_out_the_first_layer():
    log = _Log()
    pb = bar(None, "calibrate", "layer")
    clock = iter([100.0, 110.0, 120.0])  # setup + layer 1: 100 s; then 10 s per layer
    ll = LayerLog(pb, "calibrate", log)
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
