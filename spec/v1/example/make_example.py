"""Write the worked example of spec/v1 (README.md, "Worked example") with matq_format.CheckpointWriter.

    python spec/v1/example/make_example.py [OUT_DIR]      # default: this folder

Writes ``OUT_DIR/tiny.matq.safetensors`` (single-file form), ``OUT_DIR/tiny-matq/`` (folder form,
with a carried ``config.json``), both version 1.0, ``OUT_DIR/tiny-stacked.matq.safetensors``
(version 1.1: one stacked tensor, section 14.6), ``OUT_DIR/tiny-constant-zero.matq.safetensors``
(version 1.2: one zero point for a whole tensor, section 14.7) and
``OUT_DIR/tiny-widths.matq.safetensors`` (version 1.2: per-width block parameters, section 14.8).
Every value is fixed here, so the bytes are the same on every run; tests/test_spec.py regenerates
them and compares them byte for byte with the checked-in copies.
"""

from __future__ import annotations

import sys
import tempfile
from pathlib import Path

import numpy as np

import matq_format as mf
from matq_format.widths import WidthParams, WidthSpec

HERE = Path(__file__).resolve().parent
SINGLE_FILE = "tiny.matq.safetensors"
FOLDER = "tiny-matq"
CONFIG_JSON = '{"model_type": "example"}\n'

# One 2x8 quantized tensor, c = 8, per output channel (one scale and zero point per row). The codes
# are picked to show the corner cases the spec talks about: 31 and 32 share their int4 slice but not
# their int2 slice (slices do not nest), and 224..255 fall in the int2 extra-precision bucket.
CODES = np.array(
    [
        [0, 31, 32, 100, 128, 200, 224, 255],
        [7, 64, 96, 127, 150, 191, 240, 250],
    ],
    dtype=np.uint8,
)
SCALE = np.array([[2.0**-7], [3 * 2.0**-8]], dtype=np.float32)  # exact in F16
ZERO = np.array([[128], [120]], dtype=np.float32)  # exact in U8
NORM = np.array([1.0, 0.5], dtype=np.float32)  # an unquantized tensor, stored as it came
SOURCE = {"tool": "spec/v1/example/make_example.py"}

# Version 1.1 (14.6): two experts of a fused [experts, in, out] weight, stored as gpt-oss stores them,
# 4 input features in groups of 2, 3 outputs. Each code is 10 times its index in storage order.
STACKED = "tiny-stacked.matq.safetensors"
STACKED_CODES = np.arange(24, dtype=np.uint8).reshape(2, 4, 3) * 10
STACKED_SCALE = (2.0 ** -np.arange(4, 16, dtype=np.float32)).reshape(2, 2, 3)  # [experts, groups, out]
STACKED_ZERO = np.full((2, 2, 3), 128, np.float32)

# Version 1.2 (14.7): the codes of fc.weight on a symmetric grid, groups of 4, one zero point (128)
# for the whole tensor, recorded in the manifest instead of a fc.weight@zero entry.
CONSTANT_ZERO = "tiny-constant-zero.matq.safetensors"
CONSTANT_SCALE = np.array([[2.0**-7, 2.0**-6], [2.0**-8, 2.0**-5]], dtype=np.float32)  # [rows, groups]
ZERO_POINT = 128


# Version 1.2 (14.8): one row of 32 input features in one group, symmetric; width 2 has its own
# parameters with a minimum (sub-groups of 16), width 3 its own without one.
WIDTHS = "tiny-widths.matq.safetensors"
WIDTHS_CODES = (np.arange(32, dtype=np.uint8) * 8).reshape(1, 32)
WIDTHS_SCALE = np.array([[2.0**-6]], dtype=np.float32)
WIDTHS_ZERO = np.array([[128]], dtype=np.float32)
WIDTHS_PARAMS = {
    2: WidthParams(
        WidthSpec(2, 16, True),
        d=np.array([[2.0**-4]], np.float32),
        sc=np.array([[5, -3]], np.int8),
        dmin=np.array([[2.0**-5]], np.float32),
        mn=np.array([[12, 7]], np.uint8),
    ),
    3: WidthParams(WidthSpec(3, 16, False), d=np.array([[2.0**-5]], np.float32), sc=np.array([[9, -32]], np.int8)),
}


def write_widths(writer: mf.CheckpointWriter) -> None:
    writer.add_quantized(
        "fc.weight",
        WIDTHS_CODES,
        WIDTHS_SCALE,
        WIDTHS_ZERO,
        dtype="F32",
        group_size=None,
        scheme="symmetric",
        scale_dtype="F16",
        zero_dtype="U8",
        width_params=WIDTHS_PARAMS,
    )


def write(writer: mf.CheckpointWriter) -> None:
    writer.add_quantized(
        "fc.weight",
        CODES,
        SCALE,
        ZERO,
        dtype="BF16",
        group_size=None,
        scheme="asymmetric",
        scale_dtype="F16",
        zero_dtype="U8",
        extra_precision=(2,),
    )
    writer.add_dense("norm.weight", NORM)


def write_stacked(writer: mf.CheckpointWriter) -> None:
    writer.add_quantized(
        "experts.gate_up_proj",
        STACKED_CODES,
        STACKED_SCALE,
        STACKED_ZERO,
        dtype="BF16",
        group_size=2,
        scheme="symmetric",
        scale_dtype="F16",
        zero_dtype="U8",
        input_axis=1,
    )


def write_constant_zero(writer: mf.CheckpointWriter, zero: int | np.ndarray = ZERO_POINT) -> None:
    """``zero`` an integer: one zero point in the record (10.6); an array: a ``@zero`` entry."""
    writer.add_quantized(
        "fc.weight",
        CODES,
        CONSTANT_SCALE,
        zero,
        dtype="BF16",
        group_size=4,
        scheme="symmetric",
        scale_dtype="F16",
        zero_dtype="U8",
    )


def main(out_dir: Path) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    # 14.6 shows version 1.1 as it was written: its zero points stay an entry (no 1.2 extension).
    stacked = mf.CheckpointWriter(
        out_dir / STACKED, 8, single_file=True, source=SOURCE, overwrite=True, constant_zero=False
    )
    with stacked as w:
        write_stacked(w)
    with mf.CheckpointWriter(out_dir / CONSTANT_ZERO, 8, single_file=True, source=SOURCE, overwrite=True) as w:
        write_constant_zero(w)
    # 14.8 shows per-width parameters alone: its zero points stay an entry.
    widths = mf.CheckpointWriter(
        out_dir / WIDTHS, 8, single_file=True, source=SOURCE, overwrite=True, constant_zero=False
    )
    with widths as w:
        write_widths(w)
    with mf.CheckpointWriter(out_dir / SINGLE_FILE, 8, single_file=True, source=SOURCE, overwrite=True) as w:
        write(w)
    with tempfile.TemporaryDirectory() as tmp:
        config = Path(tmp) / "config.json"
        config.write_text(CONFIG_JSON, encoding="utf-8")
        with mf.CheckpointWriter(
            out_dir / FOLDER, 8, carry_from={"config.json": config}, source=SOURCE, overwrite=True
        ) as w:
            write(w)


if __name__ == "__main__":
    main(Path(sys.argv[1]) if len(sys.argv) > 1 else HERE)
