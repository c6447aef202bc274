"""`matq quantize` and `matq import-matgptq`: thin wrappers over matq_converters."""

from __future__ import annotations

import contextlib
import json
import time
import warnings
from collections.abc import Iterator
from pathlib import Path

import click

from ..progress import bar


def _ints(text: str | None) -> tuple[int, ...]:
    if not text:
        return ()
    try:
        return tuple(int(x) for x in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of integers") from None


def _floats(text: str | None) -> tuple[float, ...] | None:
    if not text:
        return None
    try:
        return tuple(float(x) for x in text.split(","))
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a comma-separated list of numbers") from None


def _importer_names() -> list[str]:
    from matq_converters import registry

    return registry.importers.names()


def _group_size(text: str) -> int | None:
    if text.lower() in ("channel", "none", "0"):
        return None
    try:
        return int(text)
    except ValueError:
        raise click.BadParameter(f"{text!r}: use a number of columns or 'channel'") from None


@contextlib.contextmanager
def _warnings_to_stderr() -> Iterator[None]:
    """Library warnings meant for the user (tensors stored unquantized) as ``matq: warning: ...``
    lines once the progress bar is gone, even if the run then fails; other warnings as usual."""
    from matq_converters.importers.hf.quantize import UnquantizedWarning

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", UnquantizedWarning)
        try:
            yield
        finally:
            for w in caught:
                if issubclass(w.category, UnquantizedWarning):
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


@click.command(
    epilog="""\b
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
--calib TEXT (a UTF-8 file or a folder of .txt/.md/.rst) runs the model on that text in
transformers, layer by layer, and quantizes the selected linears with multi-width GPTQ.
"""
)
@click.argument("hf_dir", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="Checkpoint folder to write.",
)
@click.option(
    "--from",
    "source_kind",
    type=click.Choice(_importer_names()),
    default="hf",
    show_default=True,
    help="hf: a float model; matgptq: import a MatGPTQ checkpoint as it is (other options ignored).",
)
@click.option(
    "--layers",
    default="ffn",
    show_default=True,
    help="ffn, attention, linear (both), or a regular expression over tensor names.",
)
@click.option(
    "--layout",
    type=click.Choice(["free", "gguf"]),
    default="gguf",
    show_default=True,
    help="gguf: symmetric, groups of 32 unless --group-size says otherwise, scales nested in "
    "256-column super-blocks, so every width exports to llama.cpp's compact types exactly.",
)
@click.option(
    "--group-size",
    "group_size",
    default=None,
    help="Input columns per scale, or 'channel' for one scale per output row (default: 128; 32 with "
    "--layout gguf).",
)
@click.option(
    "--scheme",
    type=click.Choice(["asymmetric", "symmetric"]),
    default=None,
    help="Zero points (default: asymmetric; symmetric with --layout gguf).",
)
@click.option(
    "--zero-multiple",
    default="1",
    show_default=True,
    help="Zero points on multiples of this power of two; 'slice-exact' keeps every --widths slice integral.",
)
@click.option(
    "--objective",
    type=click.Choice(["minmax", "multiwidth"]),
    default=None,
    help="multiwidth: round (and pick scales) for the lambda-weighted error of the --widths slices "
    "(default: minmax; multiwidth scales with --calib).",
)
@click.option(
    "--widths",
    default=None,
    help="Target widths of multiwidth, slice-exact and --calib (default: 8,4,2; 8,5,4,3 with --calib).",
)
@click.option(
    "--lambdas",
    default=None,
    help="One weight per width (default: all 1; with --calib 4^(r - narrowest), e.g. 1024,16,4,1).",
)
@click.option(
    "--extra-precision",
    "extra_precision",
    default=None,
    help="Widths served with the extra bucket, e.g. 2 or 2,4 (recorded, and used by multiwidth).",
)
@click.option("--code-bits", type=click.IntRange(2, 8), default=8, show_default=True)
@click.option("--scale-dtype", type=click.Choice(["F16", "BF16", "F32"]), default="F16", show_default=True)
@click.option(
    "--threads", type=click.IntRange(1, 256), default=None, help="Worker threads (default: CPUs, at most 8)."
)
@click.option(
    "--calib",
    type=click.Path(path_type=Path),
    default=None,
    help="Calibration text (file or folder): multi-width GPTQ from the model's activations on it.",
)
@click.option(
    "--calib-tokens",
    type=click.IntRange(16, None),
    default=131072,
    show_default=True,
    help="Calibration tokens at most (sequences of 512).",
)
@click.option(
    "--calib-propagate",
    type=click.Choice(["mean", "per-width"]),
    default="per-width",
    show_default=True,
    help="GPTQ error feedback: the lambda-weighted mean error, or one target per width.",
)
@click.option("--device", default="cpu", show_default=True, help="Where --calib runs: cpu, cuda or cuda:N.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
def quantize(
    hf_dir: Path,
    out: Path,
    source_kind: str,
    layers: str,
    layout: str,
    group_size: str | None,
    scheme: str | None,
    zero_multiple: str,
    objective: str,
    widths: str,
    lambdas: str | None,
    extra_precision: str | None,
    code_bits: int,
    scale_dtype: str,
    threads: int | None,
    calib: Path | None,
    calib_tokens: int,
    calib_propagate: str,
    device: str,
    force: bool,
    as_json: bool,
) -> None:
    """Quantize a Hugging Face model folder (bf16, fp16 or fp32 safetensors) into a matq checkpoint."""
    if source_kind != "hf":
        _import(source_kind, hf_dir, out, force, as_json)
        return
    from matq_converters import registry
    from matq_converters.importers.hf.source import HFSource
    from matq_format.quantspec import BY_LAYOUT, SLICE_EXACT

    total = HFSource(hf_dir).total_bytes
    t0 = time.perf_counter()
    calibrated = {}
    if calib is not None:
        calibrated = dict(
            calib=calib, calib_tokens=calib_tokens, calib_propagate=calib_propagate, device=device
        )
    settings = registry.importers.options(
        "hf",
        dict(
            code_bits=code_bits,
            group_size=BY_LAYOUT if group_size is None else _group_size(group_size),
            scheme=scheme,
            zero_multiple=zero_multiple if zero_multiple == SLICE_EXACT else _ints(zero_multiple)[0],
            layers=layers,
            objective=objective,
            widths=_ints(widths) or None,
            lambdas=_floats(lambdas),
            extra_precision=_ints(extra_precision),
            scale_dtype=scale_dtype,
            layout=layout,
            threads=threads,
            **calibrated,
        ),
    )
    with (
        _warnings_to_stderr(),
        bar(None if calib else total, "calibrate" if calib else "quantize", "layer" if calib else "B",
            unit_scale=not calib) as pb,
    ):  # fmt: skip

        def layer_done(done: int, n: int) -> None:
            pb.total = n
            pb.update(done - pb.n)

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
@click.argument("src", type=click.Path(path_type=Path))
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=click.Path(path_type=Path),
    help="Checkpoint folder to write.",
)
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable summary.")
def import_matgptq(src: Path, out: Path, force: bool, as_json: bool) -> None:
    """Import a MatGPTQ checkpoint (quant_method matgptq_quant) as a matq checkpoint."""
    _import("matgptq", src, out, force, as_json)


COMMANDS = [quantize, import_matgptq]
