"""The exporter and importer registries: typed declared options, refused duplicates, derived CLI flags."""

from __future__ import annotations

from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import build_checkpoint

from matq_cli.main import cli
from matq_converters import registry
from matq_converters.exporters.gguf.export import GGUFOptions
from matq_converters.registry import (
    ConvertOptionError,
    DuplicateConverterError,
    NoOptions,
    UnknownConverterError,
    option,
)


def test_builtin_names_and_lazy_descriptions():
    assert {"gguf", "hf"} <= set(registry.exporters.names())
    assert registry.importers.names() == ["hf", "matgptq"]
    assert all(registry.exporters.describe().values())


def test_unknown_name_lists_the_known():
    with pytest.raises(UnknownConverterError, match=r"unknown converter 'tflite'; known: gguf, hf"):
        registry.exporters.get("tflite")
    with pytest.raises(UnknownConverterError, match=r"unknown importer 'awq'; known: hf, matgptq"):
        registry.importers.get("awq")


def test_duplicate_names_are_refused_and_the_first_stays():
    class Echo:
        name, description, suffix, dependencies, Options = "echo", "test", "", (), NoOptions

    registry.exporters.register("echo", Echo)
    try:
        with pytest.raises(DuplicateConverterError, match="'echo' is already registered"):
            registry.exporters.register("echo", Echo)
        with pytest.raises(DuplicateConverterError):
            registry.exporters.register("gguf", Echo)
        assert registry.exporters.options_type("gguf") is GGUFOptions
    finally:
        registry.exporters.unregister("echo")


def test_options_are_typed_and_checked():
    o = registry.exporters.options("gguf", {"outtype": "f16", "exact": True, "types": ["Q4_1"]})
    assert o == GGUFOptions(outtype="f16", exact=True, types=("Q4_1",))
    assert registry.exporters.options("gguf") == GGUFOptions()
    with pytest.raises(ConvertOptionError, match="--to gguf has no option 'layout'; its options: outtype"):
        registry.exporters.options("gguf", {"layout": "dense"})
    with pytest.raises(ConvertOptionError, match="outtype 'q8' is not one of auto, source"):
        registry.exporters.options("gguf", {"outtype": "q8"})
    with pytest.raises(ConvertOptionError, match="exact must be bool, not str"):
        registry.exporters.options("gguf", {"exact": "yes"})
    with pytest.raises(ConvertOptionError, match="code_bits must be int, not bool"):
        registry.importers.options("hf", {"code_bits": True})
    assert registry.importers.options("hf", {"zero_multiple": "slice-exact"}).zero_multiple == "slice-exact"


def test_declared_options_become_cli_flags(tmp_path):
    from dataclasses import dataclass

    @dataclass(frozen=True)
    class EchoOptions:
        shout: bool = option(False, "Say it louder.")

    specs = registry.declared(EchoOptions)
    assert [(s.flag, s.kind, s.help) for s in specs] == [("--shout", bool, "Say it louder.")]
    text = CliRunner().invoke(cli, ["convert", "--help"]).output
    for flag in ("--outtype", "--tokenizer-pre", "--layout", "--dtype", "--max-shard-size", "--exact"):
        assert flag in text
    assert "--float-slices" not in text  # declared with cli=False


def test_a_flag_of_another_target_is_refused(tmp_path):
    ck = build_checkpoint(tmp_path / "ck")
    r = CliRunner().invoke(
        cli,
        [
            "convert",
            str(ck.path),
            "--to",
            "gguf",
            "--bits",
            "4",
            "--layout",
            "dense",
            "-o",
            str(tmp_path / "o"),
        ],
    )
    assert r.exit_code == 2 and "--layout is not an option of --to gguf" in r.output
    assert not Path(tmp_path / "o").exists()
