"""What one zero point per tensor (spec 10.6) saves: a checkpoint written with ``@zero`` entries and
with ``zero_point`` records, side by side, in the same run.

    python bench/zero_points.py CKPT [--source MODEL_FOLDER] [--widths 8,4,2]

CKPT is copied tensor by tensor twice (the same planes, scales and zero points): once with every
zero point an entry (what format 1.0 writes), once as the writer writes it now. Each copy is sliced to
every width in ``--widths``. The table gives the bytes of the matq files of each, their ratio to the
source model's weight files (``--source``: its ``*.safetensors``), and the bits per weight of the
quantized tensors alone (planes read, scales, zero points) at each width.
"""

from __future__ import annotations

import argparse
import math
import tempfile
from pathlib import Path

import matq_format as mf
from matq_format import constants as C


def copy(src: mf.Checkpoint, out: Path, constant_zero: bool) -> Path:
    """Every tensor of ``src`` again, zero points as arrays: entries, or folded where they are one integer."""
    must = [x for x in src.manifest.get("must_understand", []) if x != C.EXT_CONSTANT_ZERO]
    with mf.CheckpointWriter(
        out, src.code_bits, carry_from=src.carried_bytes() or None, source=src.source,
        extensions=src.manifest.get("extensions"), must_understand=must, constant_zero=constant_zero,
        expected_tensors=len(src.tensor_names()),
    ) as w:
        for name in src.tensor_names():
            t = src.info(name)
            if not t.quantized:
                path, offset, nbytes = src.dense_location(name)
                w.add_dense_from_file(name, path, offset, nbytes, t.dtype, t.shape, extras=t.extras)
                continue
            w.add_quantized_planes(
                name, {k: src.plane(name, k) for k in t.planes}, src.scale(name), src.zero(name),
                shape=t.shape, dtype=t.dtype, group_size=t.group_size, scheme=t.scheme,
                scale_dtype=t.scale_dtype, zero_dtype=t.zero_dtype, extra_precision=t.extra_precision,
                extras=t.extras, input_axis=t.input_axis,
            )
    return out


def matq_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.glob("*.safetensors"))


def quantized_bpw(ckpt: mf.Checkpoint, r: int) -> float:
    """Bits per weight of the quantized tensors at width r: the planes r reads, scales, zero points."""
    names = ckpt.quantized_names()
    n = sum(math.prod(ckpt.info(x).shape) for x in names)
    return 8 * sum(ckpt.bytes_for_width(x, r) for x in names) / n


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("ckpt", type=Path)
    ap.add_argument("--source", type=Path, help="the float model folder, for size ratios")
    ap.add_argument("--widths", default="8,4,2")
    args = ap.parse_args()
    widths = [int(x) for x in args.widths.split(",")]
    src = mf.open(args.ckpt)
    source = sum(p.stat().st_size for p in args.source.glob("*.safetensors")) if args.source else None
    print(f"{args.ckpt}: {len(src.quantized_names())} quantized tensors, source {source} bytes")
    print("| zero points | file | matq bytes | of source | quantized bpw at full width |")
    print("|---|---|---|---|---|")
    with tempfile.TemporaryDirectory(dir=args.ckpt.parent) as tmp:
        for label, constant in (("entries (1.0)", False), ("zero_point (1.2)", True)):
            full = copy(src, Path(tmp) / f"full-{constant}", constant)
            ck = mf.open(full)
            bpw = " ".join(f"int{r}:{quantized_bpw(ck, r):.3f}" for r in widths)
            for r in widths:
                out = full if r == src.code_bits else mf.slice_checkpoint(ck, Path(tmp) / f"int{r}-{constant}", bits=r)
                b = matq_bytes(out)
                ratio = f"{b / source:.4f}" if source else "-"
                print(f"| {label} v{ck.version} | int{r} | {b} | {ratio} | {bpw if r == widths[0] else ''} |")


if __name__ == "__main__":
    main()
