"""`matq inspect`, `matq verify`, `matq slice`: thin wrappers over matq_format."""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import click

import matq_format as mf
from matq_format.errors import printable
from matq_format.inspect import human_bytes
from matq_format.plans import summarize

from ..params import PathArg
from ..progress import bar


@click.command(
    epilog="""\b
Examples:
  matq inspect ./my-model-matq
  matq inspect ./my-model-matq --tensors
  matq inspect ./my-model-matq --json | jq '.summary'
"""
)
@click.argument("path", type=PathArg())
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output (summary and every tensor).")
@click.option("--tensors", "per_tensor", is_flag=True, help="Also list every tensor, with extra-bucket shares.")
@click.option("--no-stats", is_flag=True, help="Skip the extra-bucket share (reads every plane).")
def inspect(path: Path, as_json: bool, per_tensor: bool, no_stats: bool) -> None:
    """Summarize a checkpoint: model, what is quantized, widths it serves, size of each; --tensors for detail."""
    from matq_format.inspect import describe

    ckpt = mf.open(path)
    stats = (as_json or per_tensor) and not no_stats
    with bar(len(ckpt.tensor_names()), "inspect", "tensor") as pb:
        d = describe(ckpt, stats=stats, progress=pb.update)
    if as_json:
        click.echo(json.dumps(d, indent=2))
        return
    click.echo(f"{printable(d['path'])}  matq {d['format_version']}  c={d['code_bits']}  digest {d['digest'][:16]}")
    for line in _summary_lines(d):
        click.echo(line)
    if not per_tensor:
        click.echo("per tensor: matq inspect --tensors")
        return
    for t in d["tensors"]:
        click.echo("  " + _tensor_line(t))


def _summary_lines(d: dict) -> list[str]:
    s = d["summary"]
    lines = [
        f"model: {_model_line(d)}",
        f"quantized: {s['quantized_tensors']} of {s['tensors']} tensors, {s['quantized_weights'] / 1e6:.1f}M of "
        f"{s['weights'] / 1e6:.1f}M weights" + (f", layout {s['layout']}" if s["layout"] else ""),
    ]
    served = " ".join(f"int{r}" for r in d["widths_served"]) or "none (no quantized tensor)"
    mixed = "; tensors sliced to different widths (a Mix'n'Match slice)" if s["mixed_widths"] else ""
    lines.append(f"widths served: {served}{mixed}")
    if d["bytes_per_width"]:
        lines.append(
            "bytes read at each width (whole checkpoint, dense tensors as stored): "
            + ", ".join(
                f"int{r} {human_bytes(b)} ({s['bits_per_weight'][r]:.2f} bits/weight)"
                for r, b in d["bytes_per_width"].items()
            )
        )
    if s["importance_tensors"]:  # spec 10.8: what the budgets weigh errors by
        lines.append(
            f"importance: kept for {s['importance_tensors']} of {s['quantized_tensors']} quantized tensors "
            "(from calibration; budgets weigh each tensor's error by it)"
            + (f", sensitivity for {s['sensitivity_tensors']}" if s.get("sensitivity_tensors") else "")
        )
    cs = d["checksums"]
    lines.append(
        f"checksums: {cs['checked']} of {cs['entries']} entries read and checked"
        + ("" if cs["checked"] == cs["entries"] else "; the rest were not read (`matq verify` checks all)")
    )
    return lines


def _model_line(d: dict) -> str:
    """The architecture, the folder it was quantized from and the name its config.json carries
    (a Hub id, as transformers saved it): ``bert, from the folder model (config.json:
    nreimers/MiniLM-L6-H384-uncased)``; the checkpoint's own folder name when nothing says more."""
    s = d["summary"]
    arch = s["architecture"] or "unknown architecture"
    where = f"from the folder {s['model']}" if s["model"] else f"checkpoint {s['checkpoint']}"
    named = f" (config.json: {s['config_name']})" if s["config_name"] and s["config_name"] != s["model"] else ""
    return printable(f"{arch}, {where}{named}")


def _tensor_line(t: dict) -> str:
    shape = "x".join(map(str, t["shape"]))
    if t["kind"] == "dense":
        return f"{printable(t['name'])}  dense {t['dtype']} [{shape}]  {human_bytes(t['bytes'])}"
    g = "channel" if t["granularity"] == "channel" else f"group {t['group_size']}"
    ep = f"  ep {t['extra_precision']}" if t["extra_precision"] else ""
    share = ""
    if "extra_bucket_share" in t:
        share = "  extra bucket " + " ".join(f"int{r}:{v:.2%}" for r, v in t["extra_bucket_share"].items())
    widths = " ".join(f"int{r}:{human_bytes(b)}" for r, b in t["bytes"].items())
    zero = f" z={t['zero_point']}" if t.get("zero_point") is not None else ""  # one for the tensor (10.6)
    imp = "  importance" if t.get("importance") else ""  # kept from calibration (10.8)
    imp += "  sensitivity" if t.get("sensitivity") else ""
    return f"{printable(t['name'])}  from {t['dtype']} [{shape}] {g} {t['scheme']}{zero}{ep}{imp}  {widths}{share}"


@click.command(
    epilog="""\b
Examples:
  matq verify ./my-model-matq && echo intact
"""
)
@click.argument("path", type=PathArg())
def verify(path: Path) -> None:
    """Check structure and every checksum; exit 0 if intact, 1 otherwise."""
    ckpt = mf.open(path)
    total = sum(h.file_size for h in ckpt._headers.values())
    with bar(total, "verify", "B", unit_scale=True) as pb:
        ckpt.verify(progress=pb.update)
    n = len(ckpt.manifest["entries"])
    click.echo(
        f"{printable(str(ckpt.path))}: OK ({len(ckpt.tensor_names())} tensors, {n} entries, {human_bytes(total)} checked)"
    )


@click.command(
    name="slice",
    epilog="""\b
Examples:
  matq slice ./model-matq --bits 4 -o ./model-int4
  matq slice ./model-matq --bits 2 --extra-precision -o ./model-int2ep
  matq slice ./model-matq --plan pyramid -o ./model-mnm
  matq slice ./model-matq --plan budget:3.5 -o ./model-3.5b
  matq slice ./model-matq --plan plan.json -o ./model-custom
""",
)
@click.argument("path", type=PathArg())
@click.option("--bits", type=click.IntRange(1, 16), help="One width for every quantized tensor.")
@click.option(
    "--plan",
    help="Mix'n'Match plan: a width, pyramid|reverse_pyramid|increasing|decreasing[:2,4,8], budget:BITS, or a JSON file.",
)
@click.option("--extra-precision", is_flag=True, help="Serve with the extra bucket (2^r+1 levels).")
@click.option(
    "-o",
    "--output",
    "out",
    required=True,
    type=PathArg(),
    help="Output folder (or .safetensors file with --single-file).",
)
@click.option("--single-file", is_flag=True, help="Write one .safetensors file instead of a folder.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def slice_(
    path: Path,
    bits: int | None,
    plan: str | None,
    extra_precision: bool,
    out: Path,
    single_file: bool,
    force: bool,
) -> None:
    """Write a smaller checkpoint holding only what a width or plan needs."""
    if (bits is None) == (plan is None):
        raise click.UsageError("give exactly one of --bits or --plan")
    ckpt = mf.open(path)
    with bar(len(ckpt.tensor_names()), "slice", "tensor") as pb:
        mf.slice_checkpoint(
            ckpt,
            out,
            bits=bits,
            plan=plan,
            extra_precision=extra_precision,
            single_file=single_file,
            overwrite=force,
            progress=pb.update,
        )
    sliced = mf.open(out)
    widths = mf.resolve_plan(bits if plan is None else plan, sliced, extra_precision=extra_precision)
    s = summarize(sliced, widths, extra_precision)
    size = sum(p.stat().st_size for p in sliced.files())
    counts = Counter(widths.values())
    chosen = ", ".join(f"int{r} x{counts[r]}" for r in sorted(counts, reverse=True))
    click.echo(
        f"{out}: {s.bits_per_weight:.3f} bits per quantized weight served, {human_bytes(size)} on disk "
        f"(dense tensors as stored)\nwidths: {chosen} tensors" + (" (extra precision)" if extra_precision else "")
    )


COMMANDS = [inspect, verify, slice_]
