"""The quantization options are declared once (HFImportOptions): the `matq quantize` flags, the
keywords of quantize_hf and the QuantizeSpec they map to all come from that declaration."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from safetensors.numpy import save_file

import matq_format as mf
from matq_cli.main import cli
from matq_converters import registry
from matq_converters.importers.hf import quantize as Q
from matq_converters.importers.hf.options import HFImportOptions
from matq_format.quantspec import OptionError, QuantizeSpec

FLAGS = [
    "-o, --output",
    "--from",
    "--layers",
    "--layout",
    "--group-size",
    "--scheme",
    "--zero-multiple",
    "--objective",
    "--widths",
    "--lambdas",
    "--extra-precision",
    "--code-bits",
    "--scale-dtype",
    "--threads",
    "--calib",
    "--calib-tokens",
    "--calib-propagate",
    "--device",
    "--width-params",
    "--force",
    "--json",
    "-h, --help",
]
"""`matq quantize --help`'s flags, in order, as they were before the flags came from the declaration."""


def _hf_folder(root: Path) -> Path:
    root.mkdir(parents=True)
    (root / "config.json").write_text(json.dumps({"model_type": "llama"}))
    w = np.random.default_rng(0).normal(size=(8, 256)).astype(np.float32)
    save_file({"model.layers.0.mlp.up_proj.weight": w}, str(root / "model.safetensors"))
    return root


def test_help_lists_the_same_flags_with_their_defaults():
    text = CliRunner().invoke(cli, ["quantize", "--help"]).output
    options = text.split("Options:\n")[1].split("\n\n")[0]
    listed = [line.split()[0].rstrip(",") for line in options.splitlines() if line.startswith("  -")]
    assert listed == [f.split()[0].rstrip(",") for f in FLAGS]
    declared = [s.flag for s in registry.declared(HFImportOptions) if s.cli]
    assert declared == FLAGS[2:-3]
    for shown in ("[default: ffn]", "[default: gguf]", "[default: 1]", "[default: 8; 2<=x<=8]",
                  "[default: F16]", "[default: 8192; x>=16]", "[default: per-width]",
                  "[default: cpu]", "[1<=x<=256]"):  # fmt: skip
        assert shown in " ".join(text.split())


def _settings_of(monkeypatch, tmp_path: Path, args: list[str]) -> HFImportOptions:
    """The settings `matq quantize` hands the importer for ``args`` (the run itself stubbed)."""
    seen = {}

    def run(self, src, out, settings, **kw):
        seen["settings"] = settings
        raise SystemExit(0)

    monkeypatch.setattr(Q.HFImporter, "run", run)
    src = _hf_folder(tmp_path / "hf")
    r = CliRunner().invoke(cli, ["quantize", str(src), "-o", str(tmp_path / "q"), *args])
    assert r.exit_code == 0, r.output
    return seen["settings"]


def test_flags_parse_into_the_declared_settings(monkeypatch, tmp_path):
    s = _settings_of(
        monkeypatch,
        tmp_path,
        ["--widths", "8,4,2", "--group-size", "channel", "--zero-multiple", "slice-exact",
         "--extra-precision", "2,4", "--lambdas", "4,2,1", "--code-bits", "6", "--calib", "docs"],
    )  # fmt: skip
    assert s == HFImportOptions(
        widths=(8, 4, 2),
        group_size=None,
        zero_multiple="slice-exact",
        extra_precision=(2, 4),
        lambdas=(4.0, 2.0, 1.0),
        code_bits=6,
        calib=Path("docs"),
    )
    assert _settings_of(monkeypatch, tmp_path / "b", []) == HFImportOptions()  # defaults: the library's
    assert _settings_of(monkeypatch, tmp_path / "c", ["--zero-multiple", "4"]).zero_multiple == 4


def test_malformed_flags_are_refused_naming_the_flag(tmp_path):
    src = _hf_folder(tmp_path / "hf")
    for flag, text, why in (
        ("--widths", "a,b", "'a,b' is not a comma-separated list of integers"),
        ("--lambdas", "x", "'x' is not a comma-separated list of numbers"),
        ("--group-size", "abc", "'abc': use a number of columns or 'channel'"),
        ("--zero-multiple", "4,8", "'4,8': use an integer power of two or 'slice-exact'"),
    ):
        r = CliRunner().invoke(cli, ["quantize", str(src), "-o", str(tmp_path / "q"), flag, text])
        assert r.exit_code == 2
        assert f"Invalid value for '{flag}': {why}" in r.output
        assert not (tmp_path / "q").exists()


def test_quantize_hf_checks_keywords_and_takes_options(tmp_path):
    src = _hf_folder(tmp_path / "hf")
    with pytest.raises(OptionError, match="quantize_hf has no option 'group'; its options: layers, layout"):
        Q.quantize_hf(src, tmp_path / "q", group=64)
    with pytest.raises(OptionError, match="quantize_hf: code_bits must be int, not bool"):
        Q.quantize_hf(src, tmp_path / "q", code_bits=True)
    assert not (tmp_path / "q").exists()
    opts = HFImportOptions(layout="free", group_size=64, widths=(8, 4), objective="multiwidth")
    out = Q.quantize_hf(src, tmp_path / "q", opts, zero_multiple="slice-exact", lambdas=[2, 1])
    source = mf.open(out).source
    assert (source["group_size"], source["zero_multiple"], source["lambdas"]) == (64, 16, [2.0, 1.0])


def test_options_map_to_the_spec():
    assert HFImportOptions().spec() == QuantizeSpec.build()
    calibrated = HFImportOptions(calib="docs", layout="free").spec()
    assert calibrated == QuantizeSpec.build(layout="free", calibrated=True)
    assert calibrated.objective == "multiwidth"
    with pytest.raises(OptionError, match="unknown objective 'gptq'; known: minmax, multiwidth"):
        QuantizeSpec.build(objective="gptq")


def test_calibration_defaults_agree():
    cal = pytest.importorskip("matq_converters.importers.hf.calibration")
    assert HFImportOptions().calib_tokens == cal.DEFAULT_CALIB_TOKENS
    assert "sequences of 512" in " ".join(
        s.help for s in registry.declared(HFImportOptions) if s.name == "calib_tokens"
    )
    assert cal.DEFAULT_SEQ_LEN == 512
