"""`matq push`, `matq pull`: thin wrappers over matq_hub (the Hub client is imported when they run)."""

from __future__ import annotations

import sys
from pathlib import Path

import click

from matq_format.inspect import human_bytes

from ..params import PathArg
from ..progress import bar


def _quiet_client_bars() -> None:
    """The Hub client draws its own download bars; keep them off when stderr is not a terminal."""
    if not sys.stderr.isatty():
        from huggingface_hub.utils import disable_progress_bars

        disable_progress_bars()


@click.command(
    epilog="""\b
Examples:
  matq push ./model-matq me/model-matq
  matq push ./model-matq me/model-matq --private --message "MatQuant int8/4/2, QAT"
  matq push ./model-matq me/model-matq --revision v2 --include-export model-int4.gguf
\b
The token comes from HF_TOKEN or `hf auth login`; HF_ENDPOINT picks another Hub.
Running the same push again after a failure finishes it: uploaded files are not sent twice.
"""
)
@click.argument("ckpt", type=PathArg())
@click.argument("repo_id")
@click.option("--private", is_flag=True, help="Create the repository as private (if it does not exist).")
@click.option("--revision", help="Branch to commit to (created from main if missing). Default: main.")
@click.option("--message", "-m", help="Commit message.")
@click.option(
    "--include-export",
    "exports",
    multiple=True,
    type=PathArg(),
    metavar="FILE",
    help="An export made from this checkpoint (file or folder), uploaded under exports/. Repeatable.",
)
def push(ckpt: Path, repo_id: str, private: bool, revision: str | None, message: str | None, exports) -> None:
    """Upload a checkpoint, a model card and optional exports in one commit."""
    from matq_hub.push import push as do_push

    _quiet_client_bars()
    r = do_push(ckpt, repo_id, private=private, revision=revision, message=message, exports=exports)
    if not r.changed:
        click.echo(f"{repo_id}@{r.revision}: already up to date ({r.commit[:12]})")
        return
    gone = f", {len(r.deleted)} stale plane files removed" if r.deleted else ""
    click.echo(f"{repo_id}@{r.revision}: {len(r.files)} files committed as {r.commit[:12]}{gone}")
    click.echo(r.commit_url)


@click.command(
    epilog="""\b
Examples:
  matq pull me/model-matq --bits 4 -o ./model-int4
  matq pull me/model-matq --bits 2 --extra-precision -o ./model-int2ep
  matq pull me/model-matq --plan pyramid -o ./model-mnm
  matq pull me/model-matq -o ./model-full                 # every plane (same as --bits 8)
  matq pull me/model-matq --bits 4 --revision v2 -o ./model-v2-int4
\b
Only the files the width reads are downloaded (base file, r+1 plane files, config and
tokenizer), through the Hugging Face cache. budget:BITS plans read the weights, so they
download every plane; the output still holds only the planes the plan picks.
"""
)
@click.argument("repo_id")
@click.option(
    "--bits", type=click.IntRange(1, 16), help="One width for every quantized tensor. Default: all planes."
)
@click.option("--extra-precision", is_flag=True, help="Serve with the extra bucket (2^r+1 levels).")
@click.option(
    "--plan",
    help="Mix'n'Match plan: a width, pyramid|reverse_pyramid|increasing|decreasing[:2,4,8], budget:BITS, or a JSON file.",
)
@click.option("--revision", help="Branch, tag or commit. Default: main.")
@click.option("-o", "--output", "out", required=True, type=PathArg(), help="Output folder.")
@click.option("--force", is_flag=True, help="Replace OUT if it exists.")
def pull(
    repo_id: str,
    bits: int | None,
    extra_precision: bool,
    plan: str | None,
    revision: str | None,
    out: Path,
    force: bool,
) -> None:
    """Download one width (or plan) of a checkpoint and write it as a checkpoint folder."""
    from matq_hub.pull import pull as do_pull

    if bits is not None and plan is not None:
        raise click.UsageError("give at most one of --bits or --plan")
    _quiet_client_bars()
    with bar(None, "slice", "tensor") as pb:
        r = do_pull(
            repo_id,
            out,
            bits=bits,
            plan=plan,
            extra_precision=extra_precision,
            revision=revision,
            overwrite=force,
            progress=pb.update,
        )
    widths = sorted(set(r.widths.values()))
    click.echo(
        f"{out}: {repo_id}@{r.commit[:12]}, widths {widths}, {len(r.files)} files ({human_bytes(r.needed_bytes)}) needed"
    )


COMMANDS = [push, pull]
