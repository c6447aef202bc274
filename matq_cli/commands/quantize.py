"""`matq quantize` and `matq import-matgptq`: thin wrappers over matq_converters."""

from __future__ import annotations

import contextlib
import json
import os
import time
import warnings
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click
from click.core import ParameterSource

from ..params import PathArg
from ..progress import LayerLog, bar

if TYPE_CHECKING:
    from matq_converters.importers.hf.options import FlagText
    from matq_converters.registry import OptionSpec


def _importer_names() -> list[str]:
    from matq_converters import registry

    return registry.importers.names()


@contextlib.contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    """Library warnings meant for the user (tensors stored unquantized, generic rules) as ``matq: warning: ...``
    lines once the progress bar is gone, even if the run then fails; other warnings as usual."""
    from matq_converters.importers.hf.quantize import SelectionWarning
    from matq_converters.text import SkippedFilesWarning

    shown = (SelectionWarning, SkippedFilesWarning)
    with warnings.catch_warnings(record=True) as caught:
        for category in shown:
            warnings.simplefilter("always", category)
        try:
            yield
        finally:
            for w in caught:
                if issubclass(w.category, shown):
                    click.echo(f"matq: warning: {w.message}", err=True)
                else:
                    warnings.showwarning(w.message, w.category, w.filename, w.lineno)


def _report(out: Path, seconds: float, source_bytes: int, as_json: bool) -> None:
    import matq_format as mf

    ckpt = mf.open(out)
    q = ckpt.quantized_names()
    d = {
        "path": str(out),
        "digest": ckpt.digest,
        "tensors": len(ckpt.tensor_names()),
        "quantized": len(q),
        "quantized_weights": sum(ckpt.info(n).numel for n in q),
        "source_bytes": source_bytes,
        "seconds": round(seconds, 3),
        "source": ckpt.source,
    }
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    rate = source_bytes / seconds / 1e6 if seconds > 0 else float("inf")
    click.echo(
        f"{out}: {d['quantized']} of {d['tensors']} tensors quantized "
        f"({d['quantized_weights'] / 1e6:.1f}M weights), {seconds:.1f} s, {rate:.0f} MB/s of source"
    )


class _Parsed(click.ParamType):
    """A flag whose text the option declares how to read (``FlagText.parse``)."""

    name = "text"

    def __init__(self, parse: Callable[[str], Any]):
        self.parse = parse

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if not isinstance(value, str):  # a default, already a value
            return value
        try:
            return self.parse(value)
        except ValueError as exc:
            self.fail(str(exc), param, ctx)


def _flag_type(spec: OptionSpec, how: FlagText) -> Any:
    """The click type of one declared setting: its choices, parser, integer range, or path."""
    if spec.choices:
        return click.Choice(list(spec.choices))
    if how.parse is not None:
        return _Parsed(how.parse)
    if how.bounds is not None:
        return click.IntRange(*how.bounds)
    if os.PathLike in spec.kinds:
        return PathArg()
    return spec.kind


def _declared_flags() -> list[click.Option]:
    """One flag per ``HFImportOptions`` setting, as its declaration says (help, type, default)."""
    from matq_converters import registry
    from matq_converters.importers.hf.options import HFImportOptions, flag_texts

    texts = flag_texts()
    return [
        click.Option(
            [spec.flag, spec.name],
            type=_flag_type(spec, texts[spec.name]),
            default=spec.default if texts[spec.name].show_default else None,
            show_default=texts[spec.name].show_default,
            help=spec.help,
        )
        for spec in registry.declared(HFImportOptions)
        if spec.cli
    ]


def quantize(hf_dir: Path, out: Path, source_kind: str, force: bool, as_json: bool, **given: Any) -> None:
    """Quantize a Hugging Face model folder (bf16, fp16 or fp32 safetensors) into a matq checkpoint."""
    if source_kind != "hf":
        _import(source_kind, hf_dir, out, force, as_json)
        return
    from matq_converters import registry
    from matq_converters.importers.hf.source import HFSource

    ctx = click.get_current_context()  # flags not given: the declared defaults, as for a library caller
    typed = {k: v for k, v in given.items() if ctx.get_parameter_source(k) is ParameterSource.COMMANDLINE}
    settings = registry.importers.options("hf", typed)
    calib = settings.calib is not None
    total = HFSource(hf_dir).total_bytes
    t0 = time.perf_counter()
    with (
        _warnings_to_stderr(),
        bar(None if calib else total, "calibrate" if calib else "quantize", "layer" if calib else "B",
            unit_scale=not calib) as pb,
    ):  # fmt: skip

        layer_done = LayerLog(pb, "calibrate")  # a bar in a terminal, a line per layer in a log
        registry.importers.get("hf").run(
            hf_dir,
            out,
            settings,
            overwrite=force,
            progress=None if calib else pb.update,
            layer_progress=layer_done if calib else None,
        )
    _report(out, time.perf_counter() - t0, total, as_json)


def _import(kind: str, src: Path, out: Path, force: bool, as_json: bool) -> None:
    """An importer without settings of its own (``--from matgptq``): the checkpoint as it is."""
    from matq_converters import registry
    from matq_converters.importers.hf.source import HFSource

    importer = registry.importers.get(kind)
    total = HFSource(src).total_bytes
    t0 = time.perf_counter()
    with bar(total, "import", "B", unit_scale=True) as pb:
        importer.run(src, out, registry.importers.options(kind), overwrite=force, progress=pb.update)
    _report(out, time.perf_counter() - t0, total, as_json)


@click.command(
    "import-matgptq",
    epilog="""\b
Examples:
  matq import-matgptq ./Llama-3.1-8B-MatGPTQ -o ./Llama-3.1-8B-matq
  matq import-matgptq ./model -o out --json

\b
Every qweight [out, in] (uint8 codes, zero 128) with its scales [out, in/group] becomes the
tensor <prefix>.weight; its dequantized weights equal MatGPTQ's at every width.
""",
)
@click.argument("src", type=PathArg())
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=PathArg(),
    help="Checkpoint folder to write.",
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
def import_matgptq(src: Path, out: Path, force: bool, as_json: bool) -> None:
    """Import a MatGPTQ checkpoint (quant_method matgptq_quant) as a matq checkpoint."""
    _import("matgptq", src, out, force, as_json)


@click.command(
    "import-gguf",
    epilog="""\b
Examples:
  matq import-gguf SmolLM2-135M-Instruct-Q8_0.gguf -o ./SmolLM2-135M-float
  matq import-gguf model.gguf -o ./model-float --dtype bfloat16
  matq quantize ./SmolLM2-135M-float -o ./SmolLM2-135M-matq --layers linear

\b
transformers reads the file (its GGUF reader: the architectures it knows, causal LMs) and
dequantizes every tensor; the folder holds those float weights, the config, generation config and
tokenizer. A GGUF quantized below 8 bits makes a float model that is already rounded: quantizing
it again adds to that rounding. Needs the gguf and hf extras.
""",
)
@click.argument("src", type=PathArg())
@click.option(
    "-o", "--output", "out", required=True, type=PathArg(), help="Model folder to write."
)
@click.option(
    "--dtype",
    type=click.Choice(["float32", "bfloat16", "float16"]),
    default="float32",
    show_default=True,
    help="The weights' type in the folder; float32 keeps every dequantized value exactly.",
)
@click.option("--force", is_flag=True, help="Replace OUT if this command wrote it.")
def import_gguf(src: Path, out: Path, dtype: str, force: bool) -> None:
    """Write a float Hugging Face model folder from a GGUF file, for `matq quantize`."""
    from matq_converters.importers.gguf import import_gguf as run

    t0 = time.perf_counter()
    run(src, out, dtype=dtype, overwrite=force)
    click.echo(f"{out}: a {dtype} model folder from {src.name}, {time.perf_counter() - t0:.1f} s")


EPILOG = """\b
Examples:
  matq quantize ./Llama-3.2-1B -o ./Llama-3.2-1B-matq
  matq quantize ./Qwen2-0.5B -o out --layers linear --group-size channel
  matq quantize ./gemma-2-2b -o out --objective multiwidth --widths 8,4,2 --lambdas 1,1,1
  matq quantize ./model -o out --layers 'layers\\.(1[0-9])\\.mlp' --zero-multiple slice-exact
  matq quantize ./model -o out --from matgptq       # same as: matq import-matgptq ./model -o out
  matq quantize ./SmolLM2-135M -o out --layers linear --calib docs/ --calib-tokens 65536

\b
Defaults: FFN weights only (--layers linear for llama.cpp files), the gguf layout: MinMax,
symmetric, groups of 32, float16 scales signed and nested so every width exports exactly to
llama.cpp's compact types (--layout free: any scheme, groups of 128 by default). Embeddings, norms
and the output head stay as they are.
--calib TEXT (a UTF-8 file or a folder of text files) runs the model on that text in
transformers, layer by layer, and quantizes the selected linears with multi-width GPTQ.
"""


def _build() -> click.Command:
    """The command: source and output, then one flag per declared ``--from hf`` setting."""
    params = [
        click.Argument(["hf_dir"], type=PathArg()),
        click.Option(
            ["-o", "--output", "out"],
            required=True,
            type=PathArg(),
            help="Checkpoint folder to write.",
        ),
        click.Option(
            ["--from", "source_kind"],
            type=click.Choice(_importer_names()),
            default="hf",
            show_default=True,
            help="hf: a float model; matgptq: import a MatGPTQ checkpoint as it is (other options ignored).",
        ),
        *_declared_flags(),
        click.Option(["--force"], is_flag=True, help="Replace OUT if it exists."),
        click.Option(["--json", "as_json"], is_flag=True, help="Machine-readable summary."),
    ]
    return click.Command("quantize", callback=quantize, params=params, help=quantize.__doc__, epilog=EPILOG)


COMMANDS = [_build(), import_matgptq, import_gguf]
