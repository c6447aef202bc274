"""`matq convert`: a checkpoint at one width or plan, written in another format (thin wrapper)."""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import click

from ..progress import bar


def _known() -> str:
    from matq_converters import registry

    return ", ".join(f"{n} ({d})" if d else n for n, d in registry.describe().items())


@click.command(
    epilog="""\b
Examples:
  matq convert ./model-matq --to gguf --bits 4 -o model-int4.gguf
  matq convert ./model-matq --to gguf --bits 2 --extra-precision -o model-int2ep.gguf
  matq convert ./model-matq --to gguf --plan pyramid --outtype f16 -o model-mnm.gguf
  matq convert ./model-matq --to gguf --plan budget:3.5 -o model-3.5b.gguf --json
"""
)
@click.argument("path", type=click.Path(path_type=Path))
@click.option("--to", "target", required=True, help="Target format (known: gguf; hf and onnx will follow).")
@click.option("--bits", type=click.IntRange(1, 16), help="One width for every quantized tensor.")
@click.option(
    "--plan",
    help="Mix'n'Match plan, as in `matq slice`: a width, pyramid|reverse_pyramid|increasing|decreasing"
    "[:2,4,8], budget:BITS, or a JSON file.",
)
@click.option("--extra-precision", is_flag=True, help="Serve with the extra bucket (2^r+1 levels).")
@click.option(
    "--outtype",
    type=click.Choice(["auto", "source", "f32", "f16", "bf16", "q8_0"]),
    default="auto",
    show_default=True,
    help="Type of unquantized 2-D tensors (embeddings, head): auto picks as llama.cpp does for the "
    "width (Q6_K; Q8_0 at int8 or where rows are not multiples of 256), source keeps them as stored. "
    "1-D tensors are always f32.",
)
@click.option(
    "--exact",
    is_flag=True,
    help="Only types that hold each slice exactly, even where that is bigger than the width's compact "
    "type (and unquantized tensors as stored unless --outtype says otherwise).",
)
@click.option("--tokenizer-pre", help="GGUF: llama.cpp pre-tokenizer name, when matq cannot infer it.")
@click.option("-o", "--output", "out", required=True, type=click.Path(path_type=Path), help="Output file.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable report on stdout.")
def convert(
    path: Path,
    target: str,
    bits: int | None,
    plan: str | None,
    extra_precision: bool,
    outtype: str,
    tokenizer_pre: str | None,
    exact: bool,
    out: Path,
    force: bool,
    as_json: bool,
) -> None:
    """Export a checkpoint at one width (or a Mix'n'Match plan) to another format, e.g. GGUF for llama.cpp."""
    from matq_converters import registry

    import matq_format as mf

    if (bits is None) == (plan is None):
        raise click.UsageError("give exactly one of --bits or --plan")
    conv = registry.get(target)
    if not os.environ.get("MATQ_DEBUG"):
        logging.getLogger("gguf").setLevel(logging.ERROR)  # gguf-py's notes on tokenizer templates
    extra = {"tokenizer_pre": tokenizer_pre} if tokenizer_pre else {}
    if exact:
        extra["exact"] = True
    options = registry.ConvertOptions(bits, plan, extra_precision, outtype, force, extra)
    ckpt = mf.open(path)
    for w in conv.validate(ckpt, options):
        click.echo(f"matq: warning: {w}", err=True)
    with bar(len(ckpt.tensor_names()), f"convert to {target}", "tensor") as pb:
        result = conv.convert(ckpt, out, options, progress=pb.update)
    for w in result.warnings:
        click.echo(f"matq: warning: {w}", err=True)
    if as_json:
        click.echo(json.dumps({"path": str(result.path), **result.details}, indent=2))
    else:
        click.echo(result.summary)


convert.help = (convert.help or "") + f"\n\nTargets: {_known()}."
COMMANDS = [convert]
