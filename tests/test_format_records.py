"""One check of a tensor's name and record (issue 21, item 3): the writer refuses before writing
what the manifest parser refuses after reading, in the same words (``manifest.check_tensor``)."""

from __future__ import annotations

import json

import numpy as np
import pytest

import matq_format as mf
from matq_format.checkpoint import UNDERSTOOD_EXTENSIONS
from matq_format.errors import HeaderError, WriterError
from matq_format.manifest import parse_manifest

GOOD = dict(
    shape=(1, 4),
    dtype="F32",
    group_size=None,
    scheme="asymmetric",
    scale_dtype="F32",
    zero_dtype="F32",
    extra_precision=(),
)
PLANES = {k: np.zeros(8, np.uint8) for k in range(4)}
BAD = {  # a writer keyword, its bad value, and the manifest record that holds the same
    "dtype": ("dtype", "I8", {"dtype": "I8"}),
    "shape_1d": ("shape", (4,), {"shape": [4]}),
    "input_axis": ("input_axis", 5, {"input_axis": 5}),
    "scheme": ("scheme", "nf4", {"scheme": "nf4"}),
    "scale_dtype": ("scale_dtype", "F64", {"scale_dtype": "F64"}),
    "zero_dtype": ("zero_dtype", "I8", {"zero_dtype": "I8"}),
    "group_size_zero": ("group_size", 0, {"granularity": "group", "group_size": 0}),
    "group_size_huge": ("group_size", 2**41, {"granularity": "group", "group_size": 2**41}),
    "extra_precision_at_c": ("extra_precision", (4,), {"extra_precision": [4]}),
    "extra_precision_twice": ("extra_precision", (2, 2), {"extra_precision": [2, 2]}),
}


@pytest.mark.parametrize("case", sorted(BAD))
def test_writer_and_parser_refuse_a_record_in_the_same_words(tmp_path, case):
    key, value, record = BAD[case]
    out = tmp_path / "ck"
    with mf.CheckpointWriter(out, 4) as w:
        with pytest.raises(WriterError) as wi:
            w.add_quantized_planes("t", PLANES, [[1.0]], [[0.0]], **{**GOOD, key: value})
        w.add_quantized_planes("t", PLANES, [[1.0]], [[0.0]], **GOOD)  # the refused call left nothing
    manifest = mf.open(out).manifest
    manifest["tensors"]["t"].update(record)
    with pytest.raises(HeaderError) as pi:
        parse_manifest(out, json.dumps(manifest), UNDERSTOOD_EXTENSIONS)
    written, parsed = wi.value.message.split("t: ", 1)[1], pi.value.message.split("tensor 't': ", 1)[1]
    assert written == parsed and type(pi.value) is HeaderError


@pytest.mark.parametrize("name", ["a@b", "", "__metadata__"])
def test_writer_and_parser_refuse_a_name_in_the_same_words(tmp_path, name):
    out = tmp_path / "ck"
    with mf.CheckpointWriter(out) as w:
        with pytest.raises(WriterError) as wi:
            w.add_dense(name, np.zeros(1, np.float32))
        w.add_dense("t", np.zeros(1, np.float32))
    manifest = mf.open(out).manifest
    manifest["tensors"][name] = manifest["tensors"]["t"]
    with pytest.raises(HeaderError) as pi:
        parse_manifest(out, json.dumps(manifest))
    assert wi.value.message == pi.value.message and "free of '@'" in pi.value.message
