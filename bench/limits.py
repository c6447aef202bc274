"""Time and peak memory of opening and slicing checkpoints at the format's limits (constants.py).

Each case is written with ``CheckpointWriter`` (tiny tensors, so the headers are all there is),
adding tensors until the writer refuses one for a limit or the case's count is reached; then
``mf.open`` and ``slice_checkpoint(bits=4)`` each run in a fresh process, which reports its wall
time and peak RSS (``VmHWM``: the whole process, Python and numpy included).

    python bench/limits.py [--cases dense,moe,short,single,long] [--json out.json]

Cases (c = 8):
  dense   MAX_TENSORS zero-size dense tensors with short names: the most tensors a reader takes
  moe     1x1 quantized tensors named like MoE experts (48 characters): as many as one header holds
  short   1x1 quantized tensors with short names: the most entries a valid checkpoint can have
  single  ``short`` as one file: every entry in one header
  long    dense tensors with MAX_NAME_BYTES-byte names: the fewest, largest names

Measured on 2 shared CPUs (timings noisy; peak RSS is not), seconds / MiB, before -> after issue 10:

  case    tensors  entries  header  open                 slice (int4, open included)
  dense   262144   262144    50 MB   9.6/516 ->  4.8/403   24.3/977  -> 27.2/917
  moe      57928   579280   100 MB  15.1/934 ->  7.7/627   29.1/1416 -> 22.7/1281
  short    84777   847770   100 MB  25.5/1172 -> 12.9/761  53.5/1771 -> 35.3/1574
  single   58096   580960   100 MB  12.9/859 ->  6.9/620   28.1/1251 -> 22.7/1116
  long     30844    30844   100 MB   1.0/339 ->  0.8/244    2.9/519  ->  2.8/513

(The issue's 95 MB base file of 500k empty tensors: open 16.6 s / 928 MiB, slice 19.6 s / 1.8 GB
before; now refused, LimitError, after 4.8 s / 659 MiB.)
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

import matq_format as mf
from matq_format import constants as C
from matq_format.errors import WriterError

PROBE = r"""
import sys, time
import matq_format as mf
t = time.perf_counter()
ck = mf.open(sys.argv[1])
if len(sys.argv) > 2:
    mf.slice_checkpoint(ck, sys.argv[2], bits=4)
hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
print(time.perf_counter() - t, int(hwm.split()[1]) / 1024)
"""
"""Peak RSS is VmHWM, this process's own: ru_maxrss would count the parent's RSS at fork too."""


def write(case: str, out: Path) -> tuple[int, float]:
    """Write one case; returns (tensors written, seconds)."""
    t0 = time.perf_counter()
    single = case == "single"
    n = 0
    codes = np.zeros((1, 1), np.uint8)
    one, zero = np.ones((1, 1), np.float32), np.zeros((1, 1), np.float32)
    empty = np.zeros(0, np.float32)
    with mf.CheckpointWriter(out, 8, single_file=single, expected_tensors=C.MAX_TENSORS // 4) as w:
        while n < C.MAX_TENSORS:
            try:
                if case == "dense":
                    w.add_dense(f"t{n}", empty)
                elif case == "long":
                    w.add_dense(f"{n:08d}".ljust(C.MAX_NAME_BYTES, "x"), empty)
                else:
                    name = f"model.layers.{n // 384}.mlp.experts.{n % 384}.down_proj.weight"
                    w.add_quantized(name if case == "moe" else f"t{n}", codes, one, zero)
            except WriterError as exc:
                print(f"  {case}: writer refused tensor {n + 1}: {str(exc)[-140:]}", file=sys.stderr)
                break
            n += 1
    return n, time.perf_counter() - t0


def probe(*args: Path) -> tuple[float, float]:
    r = subprocess.run(
        [sys.executable, "-c", PROBE, *map(str, args)], check=True, capture_output=True, text=True
    )
    seconds, rss = r.stdout.split()
    return float(seconds), float(rss)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", default="dense,moe,short,single,long")
    ap.add_argument("--json", type=Path)
    args = ap.parse_args()
    rows = []
    tmp = Path(tempfile.mkdtemp(prefix="matq-bench-limits-"))
    try:
        for case in args.cases.split(","):
            out = tmp / (case + (".safetensors" if case == "single" else ""))
            n, wsec = write(case, out)
            base = out if out.is_file() else out / C.BASE_FILENAME
            with open(base, "rb") as f:
                header = int.from_bytes(f.read(8), "little")
            ck = mf.open(out)
            entries = len(ck.manifest["entries"])
            del ck
            osec, orss = probe(out)
            ssec, srss = probe(out, tmp / f"{case}-int4")
            row = dict(
                case=case,
                tensors=n,
                entries=entries,
                base_header_bytes=header,
                write_s=round(wsec, 1),
                open_s=round(osec, 2),
                open_peak_rss_mib=round(orss),
                slice_s=round(ssec, 2),
                slice_peak_rss_mib=round(srss),
            )
            rows.append(row)
            print(json.dumps(row), flush=True)
            shutil.rmtree(out) if out.is_dir() else out.unlink()
            sliced = tmp / f"{case}-int4"
            shutil.rmtree(sliced) if sliced.is_dir() else sliced.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    if args.json:
        args.json.write_text(json.dumps({"cpus": os.cpu_count(), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
