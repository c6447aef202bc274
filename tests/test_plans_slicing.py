"""Mix'n'Match plans and train-free slicing (issue 2)."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import matq_format as mf
from matq_format import numerics as N
from matq_format.budget import cheapest_within, parse_budget, tied
from matq_format.errors import MissingPlanesError, PlanError
from matq_format.plans import layer_index, summarize

ROLES = ("up_proj", "down_proj")


def build(path, layers=6, rows=16, cols=256, group=128, seed=0, carry=None, ep=(2,)):
    rng = np.random.default_rng(seed)
    with mf.CheckpointWriter(path, carry_from=carry) as w:
        for i in range(layers):
            for role in ROLES:
                x = rng.normal(size=(rows, cols)).astype(np.float32) * (1 + i)
                s, z = N.minmax_params(x, 8, group)
                w.add_quantized(
                    f"model.layers.{i}.mlp.{role}.weight",
                    N.quantize(x, s, z, 8, group),
                    s,
                    z,
                    dtype="F32",
                    group_size=group,
                    extra_precision=ep,
                )
        w.add_dense("model.norm.weight", rng.normal(size=rows).astype(np.float32))
    return mf.open(path)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    return build(tmp_path_factory.mktemp("plans") / "ck")


def test_layer_index():
    assert layer_index("model.layers.12.mlp.up_proj.weight") == 12
    assert layer_index("encoder.layer.3.output.dense.weight") == 3
    assert layer_index("transformer.h.0.mlp.c_fc.weight") == 0
    assert layer_index("model.embed_tokens.weight") is None


def test_uniform_plan(ckpt):
    assert set(mf.resolve_plan("4", ckpt).values()) == {4}
    with pytest.raises(PlanError):
        mf.resolve_plan("9", ckpt)


def by_layer(plan):
    return [plan[f"model.layers.{i}.mlp.up_proj.weight"] for i in range(6)]


def test_pattern_plans(ckpt):
    assert by_layer(mf.resolve_plan("pyramid", ckpt)) == [2, 4, 8, 8, 4, 2]
    assert by_layer(mf.resolve_plan("reverse_pyramid", ckpt)) == [8, 4, 2, 2, 4, 8]
    inc = by_layer(mf.resolve_plan("increasing", ckpt))
    assert inc == sorted(inc) and inc[0] == 2 and inc[-1] == 8
    dec = by_layer(mf.resolve_plan("decreasing", ckpt))
    assert dec == sorted(dec, reverse=True) and dec[0] == 8 and dec[-1] == 2
    assert set(mf.resolve_plan("pyramid:3,6", ckpt).values()) == {3, 6}
    with pytest.raises(PlanError):
        mf.resolve_plan("pyramid:a,b", ckpt)
    for spec in ("pyramid:1,2,3,4,5,6,7,8,8,9", "increasing:0,4,8"):  # 9 is past every layer's share of 6
        with pytest.raises(PlanError, match=r"width (9|0) outside 1..8"):
            mf.resolve_plan(spec, ckpt)


def test_file_plan(ckpt, tmp_path):
    p = tmp_path / "plan.json"
    p.write_text(json.dumps({"default": 4, "layers": {"0-1": 2, "5": 8}, "patterns": {"down_proj": 6}}))
    plan = mf.resolve_plan(str(p), ckpt)
    assert plan["model.layers.0.mlp.up_proj.weight"] == 2
    assert plan["model.layers.1.mlp.up_proj.weight"] == 2
    assert plan["model.layers.3.mlp.up_proj.weight"] == 4
    assert plan["model.layers.5.mlp.up_proj.weight"] == 8
    assert all(plan[f"model.layers.{i}.mlp.down_proj.weight"] == 6 for i in range(6))
    p.write_text(json.dumps({"patterns": {"q_proj": 4}}))
    with pytest.raises(PlanError, match="matches no"):
        mf.resolve_plan(str(p), ckpt)
    p.write_text(json.dumps({"default": 2, "extra_precision": True}))  # would be silently ignored
    with pytest.raises(PlanError, match="extra precision is not part of a plan"):
        mf.resolve_plan(str(p), ckpt)
    p.write_text("{not json")
    with pytest.raises(PlanError):
        mf.resolve_plan(str(p), ckpt)
    with pytest.raises(PlanError):
        mf.resolve_plan("no-such-plan", ckpt)


def test_budget_plan(ckpt):
    errs = []
    for budget in (2.5, 3.5, 5.0, 8.5):
        plan = mf.resolve_plan(f"budget:{budget}", ckpt)
        s = summarize(ckpt, plan)
        assert s.bits_per_weight <= budget + 1e-9
        errs.append(
            sum(float(((ckpt.dequantize(n, r) - ckpt.dequantize(n)) ** 2).sum()) for n, r in plan.items())
        )
    assert errs == sorted(errs, reverse=True) and errs[-1] == 0.0
    with pytest.raises(PlanError, match="below the narrowest"):
        mf.resolve_plan("budget:1.0", ckpt)


def test_budget_prefers_wide_ranges(ckpt):
    """Later layers were built with larger weights, so they get the bits first."""
    plan = mf.resolve_plan("budget:3.5", ckpt)
    assert by_layer(plan)[-1] >= by_layer(plan)[0]


def test_summary_counts_parameters(ckpt):
    s = summarize(ckpt, mf.resolve_plan("4", ckpt))
    # 4 code bits + (fp16 scale + u8 zero) per 128 weights
    assert s.bits_per_weight == pytest.approx(4 + 3 * 8 / 128)
    s_ep = summarize(ckpt, mf.resolve_plan("2", ckpt), extra_precision=True)
    assert 2 + 3 * 8 / 128 < s_ep.bits_per_weight < 3.2


@pytest.mark.parametrize("bits", [8, 6, 4, 3, 2, 1])
def test_slice_bits_equals_source(ckpt, tmp_path, bits):
    out = mf.slice_checkpoint(ckpt, tmp_path / "s", bits=bits)
    s = mf.open(out)
    s.verify()
    for name in ckpt.quantized_names():
        assert s.info(name).planes == N.planes_needed(8, bits)
        for r in range(1, bits + 1):
            for ep in (False, True) if r < 8 else (False,):
                assert np.array_equal(s.dequantize(name, r, ep), ckpt.dequantize(name, r, ep))
        if bits < 8:
            with pytest.raises(MissingPlanesError):
                s.dequantize(name, bits + 1)
    assert np.array_equal(s.dense("model.norm.weight"), ckpt.dense("model.norm.weight"))
    assert s.source["sliced_from"] == ckpt.digest
    if bits < 7:
        missing = {f"matq-plane-{k}.safetensors" for k in range(8 - bits - 1)}
        assert not missing & set(os.listdir(out))


def test_slice_size_shrinks(tmp_path):
    ckpt = build(tmp_path / "big", layers=4, rows=128, cols=512)
    sizes = {}
    for bits in (8, 4, 2):
        out = mf.slice_checkpoint(ckpt, tmp_path / f"s{bits}", bits=bits)
        sizes[bits] = sum(p.stat().st_size for p in mf.open(out).files())
    assert sizes[2] < sizes[4] < sizes[8]
    assert sizes[2] / sizes[8] < 0.40 and sizes[4] / sizes[8] < 0.65


def test_slice_plan_single_file_and_carry(tmp_path):
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text('{"model_type": "llama"}')
    (hf / "tokenizer.json").write_text("{}")
    src = build(tmp_path / "ck", carry=hf)
    assert set(src.carried_files()) == {"config.json", "tokenizer.json"}
    out = mf.slice_checkpoint(src, tmp_path / "mnm", plan="pyramid")
    s = mf.open(out)
    s.verify()
    assert set(s.carried_files()) == {"config.json", "tokenizer.json"}
    plan = mf.resolve_plan("pyramid", src)
    for name, r in plan.items():
        assert s.info(name).planes == N.planes_needed(8, r)
        assert np.array_equal(s.dequantize(name, r), src.dequantize(name, r))
    single = mf.slice_checkpoint(src, tmp_path / "one.safetensors", bits=4, single_file=True)
    assert single.is_file()
    one = mf.open(single)
    assert one.manifest["files"] == {}
    for name in src.quantized_names():
        assert np.array_equal(one.dequantize(name, 4), src.dequantize(name, 4))


def test_failed_slice_leaves_nothing(ckpt, tmp_path):
    s4 = mf.slice_checkpoint(ckpt, tmp_path / "s4", bits=4)
    before = sorted(os.listdir(tmp_path))
    with pytest.raises(PlanError):
        mf.slice_checkpoint(s4, tmp_path / "s8", bits=8)
    with pytest.raises(PlanError):
        mf.slice_checkpoint(ckpt, tmp_path / "x", plan="budget:0.5")
    assert sorted(os.listdir(tmp_path)) == before


@settings(max_examples=15, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(widths=st.lists(st.sampled_from([1, 2, 3, 4, 5, 6, 7, 8]), min_size=12, max_size=12), ep=st.booleans())
def test_sliced_plan_equals_slicing_source(ckpt, tmp_path_factory, widths, ep):
    names = ckpt.quantized_names()
    plan = dict(zip(names, widths, strict=True))
    out = mf.slice_checkpoint(ckpt, tmp_path_factory.mktemp("h") / "s", plan=plan, extra_precision=ep)
    s = mf.open(out)
    for name, r in plan.items():
        use_ep = ep and r < 8
        assert np.array_equal(
            s.dequantize(name, r, use_ep),
            N.dequantize(ckpt.codes(name), ckpt.scale(name), ckpt.zero(name), 8, r, 128, use_ep),
        )


def test_partial_view_serves_present_widths(ckpt, tmp_path):
    """A folder missing some plane files (a width-selective download) opens with partial=True."""
    import shutil

    part = tmp_path / "part"
    shutil.copytree(ckpt.root, part)
    for k in range(5):
        (part / f"matq-plane-{k}.safetensors").unlink()
    with pytest.raises(mf.errors.MissingFileError):
        mf.open(part)
    p = mf.open(part, partial=True)
    p.verify()
    name = ckpt.quantized_names()[0]
    assert p.info(name).planes == (7, 6, 5) and p.info(name).max_width(8) == 2
    assert np.array_equal(p.dequantize(name, 2, True), ckpt.dequantize(name, 2, True))
    with pytest.raises(MissingPlanesError):
        p.dequantize(name, 4)
    out = mf.slice_checkpoint(p, tmp_path / "int2", bits=2)
    s = mf.open(out)
    assert np.array_equal(s.dequantize(name, 2), ckpt.dequantize(name, 2))
    with pytest.raises(PlanError):
        mf.slice_checkpoint(p, tmp_path / "int4", bits=4)


# --- issue 10, item 7c/7d: budgets that are no number of bits, extra precision at the code width ---
@pytest.mark.parametrize("budget", ["nan", "inf", "-inf", "-1", "0", "-0.0"])
def test_budget_must_be_positive_and_finite(ckpt, budget):
    with pytest.raises(PlanError, match="budget must be a positive, finite number") as ei:
        mf.resolve_plan(f"budget:{budget}", ckpt)
    assert ei.value.path == f"budget:{budget}"


@pytest.mark.parametrize(
    "spec,message",
    [
        ("budget:", "budget must be a number"),
        ("budget:four", "budget must be a number"),
        ("budget", "budget must be a number"),
        ("budget:nan", "budget must be a positive, finite number"),
        ("budget:-2", "budget must be a positive, finite number"),
    ],
)
def test_parse_budget_is_the_one_reading_of_a_budget(spec, message):
    """matq's plans and the gguf and onnx exporters read ``budget:BITS`` with this one function."""
    assert parse_budget("budget:3.5") == 3.5 and parse_budget("budget: 4 ") == 4.0
    with pytest.raises(PlanError, match=message) as ei:
        parse_budget(spec)
    assert ei.value.path == spec and type(ei.value) is PlanError


def test_extra_precision_needs_a_width_below_the_code_width(ckpt, tmp_path):
    from matq_format.errors import WidthError

    for spec in ("8", 8, {}):  # a width, an int, a plan that leaves every tensor at c
        with pytest.raises(WidthError, match="extra precision needs a width below the code width 8"):
            mf.resolve_plan(spec, ckpt, extra_precision=True)
    with pytest.raises(WidthError, match="extra precision"):
        mf.slice_checkpoint(ckpt, tmp_path / "s", bits=8, extra_precision=True)
    assert not (tmp_path / "s").exists()
    # Mixed plans keep extra precision for the tensors below c.
    plan = mf.resolve_plan("pyramid:2,8", ckpt, extra_precision=True)
    assert set(plan.values()) == {2, 8}
    assert mf.resolve_plan("8", ckpt) == dict.fromkeys(ckpt.quantized_names(), 8)


def test_cli_rejects_budget_and_extra_precision_at_c(ckpt, tmp_path):
    from click.testing import CliRunner

    from matq_cli.main import cli

    src = str(ckpt.root)
    for args in (["--plan", "budget:nan"], ["--plan", "budget:inf"], ["--bits", "8", "--extra-precision"]):
        r = CliRunner().invoke(cli, ["slice", src, *args, "-o", str(tmp_path / "s")])
        assert r.exit_code == 1, r.output
        line = r.output.strip()
        assert line.startswith("matq: ") and "\n" not in line and "internal error" not in line, line
        assert not (tmp_path / "s").exists()
    hf = tmp_path / "hf"
    hf.mkdir()
    (hf / "config.json").write_text(json.dumps({"model_type": "llama", "num_hidden_layers": 6}))
    build(tmp_path / "ck", layers=2, carry=hf)
    r = CliRunner().invoke(
        cli,
        [str(a) for a in ("convert", tmp_path / "ck", "--to", "gguf", "--bits", 8, "--extra-precision", "-o", tmp_path / "m.gguf")],
    )
    assert r.exit_code == 1, r.output
    assert r.output.startswith("matq: ") and "extra precision needs a width below the code width 8" in r.output
    assert not (tmp_path / "m.gguf").exists()


def test_tied_groups_names_linked_through_ties():
    """A name in two ties joins them; names in no tie stand alone; names outside ``names`` are dropped."""
    names = ["a", "b", "c", "d", "e"]
    assert tied(names, [("b", "d"), ("d", "e", "x"), ("c",)]) == [("a",), ("b", "d", "e"), ("c",)]
    assert tied(names, []) == [(n,) for n in names]
    err = {("a",): {2: 4.0, 4: 1.0}, ("b", "d"): {2: 9.0, 4: 2.0}}
    cost = {("a",): {2: 2.0, 4: 4.0}, ("b", "d"): {2: 4.0, 4: 8.0}}
    assert cheapest_within(err, cost, 10.0) == {("a",): 2, ("b", "d"): 4}  # 7/4 per bit beats 3/2
