"""`matq convert`: a checkpoint at one width or plan, written in another format (thin wrapper).

The target-specific flags are not written here: each exporter declares its settings
(``registry.option`` fields of its ``Options``), and one flag is made per setting name.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path

import click
from click.core import ParameterSource

from ..params import PathArg
from ..progress import bar, ticking


def _known() -> str:
    from matq_converters import registry

    return ", ".join(f"{n} ({d})" if d else n for n, d in registry.exporters.describe().items())


def _declared_flags() -> dict[str, list]:
    """Setting name -> [(target, OptionSpec)] over every exporter's declared CLI settings."""
    from matq_converters import registry

    flags: dict[str, list] = {}
    for name in registry.exporters.names():
        for spec in registry.declared(registry.exporters.options_type(name)):
            if spec.cli:
                flags.setdefault(spec.name, []).append((name, spec))
    return flags


def _click_option(name: str, uses: list) -> click.Option:
    """One flag for a setting several targets may share (same type; the choices of all)."""
    spec = uses[0][1]
    kinds = {s.kind for _, s in uses}
    if len(kinds) > 1:
        raise TypeError(f"setting {name} has different types in {', '.join(t for t, _ in uses)}")
    helps = " ".join(f"[{t}] {s.help}" for t, s in uses)
    decl = [spec.flag, name]
    if spec.kind is bool:
        return click.Option(decl, is_flag=True, default=None, help=helps)
    choices = [c for _, s in uses for c in s.choices]
    kind = click.Choice(list(dict.fromkeys(choices))) if choices else spec.kind
    return click.Option(decl, type=kind, default=None, help=helps)


def _settings(ctx: click.Context, target: str, given: dict) -> dict:
    """The flags given on the command line that belong to ``target``; others are refused."""
    from matq_converters import registry

    own = {s.name for s in registry.declared(registry.exporters.options_type(target))}
    out = {}
    for name, value in given.items():
        if ctx.get_parameter_source(name) is not ParameterSource.COMMANDLINE:
            continue
        if name not in own:
            flag = "--" + name.replace("_", "-")
            raise click.UsageError(f"{flag} is not an option of --to {target}")
        out[name] = value
    return out


def convert(
    path: Path,
    target: str,
    bits: int | None,
    plan: str | None,
    extra_precision: bool,
    out: Path,
    force: bool,
    as_json: bool,
    **given,
) -> None:
    """Export a checkpoint at one width (or a Mix'n'Match plan) to another format: GGUF for llama.cpp,
    a Hugging Face folder for transformers (and, untested here, vLLM), an ONNX folder for onnxruntime
    and onnxruntime-genai."""
    import matq_format as mf
    from matq_converters import registry

    if (bits is None) == (plan is None):
        raise click.UsageError("give exactly one of --bits or --plan")
    settings = _settings(click.get_current_context(), target, given)
    conv = registry.exporters.get(target)
    if not os.environ.get("MATQ_DEBUG"):
        logging.getLogger("gguf").setLevel(logging.ERROR)  # gguf-py's notes on tokenizer templates
    options = registry.ConvertOptions(
        bits, plan, extra_precision, force, registry.exporters.options(target, settings)
    )
    ckpt = mf.open(path)
    what = f"plan {plan}" if plan is not None else f"check int{bits} for --to {target}"
    with ticking(None, what):  # a budget: plan tries every width of every tensor
        warned = conv.validate(ckpt, options)
    for w in warned:
        click.echo(f"matq: warning: {w}", err=True)
    with bar(len(ckpt.tensor_names()), f"convert to {target}", "tensor") as pb:
        result = conv.convert(ckpt, out, options, progress=pb.update)
    for w in result.warnings:
        click.echo(f"matq: warning: {w}", err=True)
    if as_json:
        click.echo(json.dumps({"path": str(result.path), **result.details}, indent=2))
    else:
        click.echo(result.summary)


EPILOG = """\b
Examples:
  matq convert ./model-matq --to gguf --bits 4 -o model-int4.gguf
  matq convert ./model-matq --to gguf --bits 2 --extra-precision -o model-int2ep.gguf
  matq convert ./model-matq --to gguf --plan pyramid --outtype f16 -o model-mnm.gguf
  matq convert ./model-matq --to gguf --plan budget:3.5 -o model-3.5b.gguf --json
  matq convert ./model-matq --to hf --bits 4 -o model-int4-hf              # compressed-tensors
  matq convert ./model-matq --to hf --bits 4 --layout dense --dtype bfloat16 -o model-int4-dense
  matq convert ./model-matq --to onnx --bits 4 -o model-int4-onnx             # MatMulNBits
  matq convert ./model-matq --to onnx --bits 2 --layout qdq -o model-int2-qdq  # DequantizeLinear
"""


def _build() -> click.Command:
    """The command: the common flags, then one per declared exporter setting."""
    params = [
        click.Argument(["path"], type=PathArg()),
        click.Option(["--to", "target"], required=True, help=f"Target format: {_known()}."),
        click.Option(["--bits"], type=click.IntRange(1, 16), help="One width for every quantized tensor."),
        click.Option(
            ["--plan"],
            help="Mix'n'Match plan, as in `matq slice`: a width, pyramid|reverse_pyramid|increasing|"
            "decreasing[:2,4,8], budget:BITS, or a JSON file.",
        ),
        click.Option(["--extra-precision"], is_flag=True, help="Serve with the extra bucket (2^r+1 levels)."),
        *(_click_option(n, uses) for n, uses in _declared_flags().items()),
        click.Option(
            ["-o", "--output", "out"], required=True, type=PathArg(), help="Output."
        ),
        click.Option(["--force"], is_flag=True, help="Replace OUT if it exists."),
        click.Option(["--json", "as_json"], is_flag=True, help="Machine-readable report on stdout."),
    ]
    return click.Command("convert", callback=convert, params=params, help=convert.__doc__, epilog=EPILOG)


COMMANDS = [_build()]
