"""`matq train`: MatQuant quantization-aware training of a Hugging Face model into a matq checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

import click

from matq_train.config import BACKEND_FAMILIES, BACKENDS

from ..params import PathArg
from ..progress import bar


def _int_or_none(ctx, param, value):
    if value is None or str(value).lower() in ("", "channel", "none"):
        return None
    try:
        v = int(value)
    except ValueError:
        raise click.BadParameter("a positive integer, or 'channel'") from None
    if v < 1:
        raise click.BadParameter("a positive integer, or 'channel'")
    return v


@click.command(
    epilog="""\b
Examples:
  matq train ./llama-tiny --data corpus/ --bits 8,4,2 --steps 500 -o llama-tiny-matq
  matq train ./llama-tiny --data a.txt --data b.jsonl --lambdas 0.1,0.1,1 --distill '8->2' -o out
  matq train ./llama-tiny --data corpus/ --extra-precision --lambdas 1,1,1 -o out-ep
  matq train ./llama-tiny --data corpus/ --baseline 2 -o llama-tiny-int2   # one width, c = 2
  matq train ./bert --data corpus/ --layers linear --group-size 64 --clip learned -o bert-matq
  torchrun --nproc-per-node 2 -m matq_cli train ./llama-tiny --data corpus/ -o out   # DDP, gloo on CPU
  matq train ./llama-tiny --data corpus/ -o out --save-every 100 --resume          # continue a run
  matq train ./SmolLM2-135M --data docs/ --device cuda --precision bf16 --grad-checkpointing -o out
  matq train ./llama-tiny --data corpus/ --backend jax -o out-jax                   # JAX, every local device
  matq train ./llama-tiny --data corpus/ --backend jax --mesh 2 --shard 4 -o out    # 2 x 4 devices, sharded
"""
)
@click.argument("model_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "--data", "data", multiple=True, required=True, help="Text file, .jsonl, or folder (repeatable)."
)
@click.option("--bits", default="8,4,2", show_default=True, help="Widths trained together (Eq. 7).")
@click.option("--lambdas", default=None, help="Loss weight per width, in --bits order [default: 1 each].")
@click.option(
    "--distill",
    default=None,
    help="Co-distillation TEACHER->STUDENT, e.g. '8->2' (quoted: > is a shell redirection).",
)
@click.option(
    "--distill-labels",
    is_flag=True,
    help="Keep the student's ground-truth loss beside the distillation loss (the paper's [8, 4, 2, 8->2]).",
)
@click.option("--extra-precision", is_flag=True, help="Slice without the clamp: 2^r + 1 levels per width.")
@click.option(
    "--baseline",
    type=click.IntRange(2, 8),
    default=None,
    help="Single-width baseline: train and store c = R.",
)
@click.option(
    "--layers", default="ffn", show_default=True, help="ffn, attention, linear, or a regex over weight names."
)
@click.option(
    "--group-size", default=None, callback=_int_or_none, help="Columns per scale [default: per channel]."
)
@click.option("--clip", type=click.Choice(["minmax", "learned"]), default="minmax", show_default=True)
@click.option("--symmetric", is_flag=True, help="Zero point fixed at 2^(c-1).")
@click.option("--steps", type=click.IntRange(min=1), default=100, show_default=True)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=8,
    show_default=True,
    help="Global sequences per step.",
)
@click.option("--seq-len", type=click.IntRange(min=2), default=128, show_default=True)
@click.option("--lr", type=float, default=1e-4, show_default=True)
@click.option(
    "--clip-lr", type=float, default=5e-3, show_default=True, help="Learning rate of learned clipping."
)
@click.option("--warmup", type=click.IntRange(min=0), default=0, show_default=True)
@click.option("--seed", type=int, default=0, show_default=True)
@click.option("--holdout", type=float, default=0.0, help="Fraction of documents held out for --eval-every.")
@click.option(
    "--eval-every", type=click.IntRange(min=0), default=0, help="Held-out loss per width every N steps."
)
@click.option("--log-every", type=click.IntRange(min=0), default=10, show_default=True)
@click.option("--save-every", type=click.IntRange(min=0), default=0, help="Trainer checkpoint every N steps.")
@click.option("--checkpoint-dir", type=PathArg(), default=None, help="[default: OUT.ckpt]")
@click.option("--resume", is_flag=True, help="Continue from the newest trainer checkpoint.")
@click.option("--fsdp", is_flag=True, help="Shard parameters with FSDP2 (under torchrun).")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="torch CPU threads.")
@click.option(
    "--backend",
    type=click.Choice(BACKENDS),
    default="torch",
    show_default=True,
    help="Training framework. " + "; ".join(f"{b}: {f}" for b, f in BACKEND_FAMILIES.items()) + ".",
)
@click.option("--device", default=None, help="torch: cpu, cuda or cuda:N [default: cuda when present].")
@click.option(
    "--precision",
    type=click.Choice(["fp32", "bf16"]),
    default="fp32",
    show_default=True,
    help="bf16: matrix products under bfloat16 autocast (weights and optimizer stay float32).",
)
@click.option("--grad-checkpointing", is_flag=True, help="Recompute activations in the backward pass.")
@click.option(
    "--mesh", type=click.IntRange(min=1), default=None, help="jax: data-parallel devices [default: all / --shard]."
)
@click.option(
    "--shard",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="jax: devices each weight matrix is sharded over by rows (FSDP-style; the mesh is --mesh x --shard).",
)
@click.option(
    "-o", "--output", "out", required=True, type=PathArg(), help="Output checkpoint folder."
)
@click.option("--json", "as_json", is_flag=True, help="Print the loss history and speed as JSON.")
def train(model_dir: Path, data, out: Path, as_json: bool, symmetric: bool, checkpoint_dir, **kw) -> None:
    """Train MODEL_DIR for several widths at once and write a matq checkpoint."""
    import sys

    from matq_train.config import TrainConfig
    from matq_train.run import train as run

    if not sys.stderr.isatty() and kw.get("backend") == "torch":
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()

    cfg = TrainConfig(
        model_dir=str(model_dir),
        data=[str(d) for d in data],
        out=str(out),
        scheme="symmetric" if symmetric else "asymmetric",
        checkpoint_dir=str(checkpoint_dir) if checkpoint_dir else None,
        **kw,
    )

    def on_log(rec: dict) -> None:
        widths = "  ".join(f"{k} {v:.4f}" for k, v in rec["widths"].items())
        ev = (
            "  held-out " + "  ".join(f"{k} {v:.4f}" for k, v in rec["eval"].items()) if "eval" in rec else ""
        )
        line = f"step {rec['step']}/{cfg.steps}  loss {rec['loss']:.4f}  {widths}{ev}  {rec['tokens_per_s']:.0f} tok/s"
        click.echo(line, err=as_json)

    with bar(cfg.steps, "train", "step") as pb:
        res = run(cfg, on_log=on_log, on_step=lambda done: pb.update(done - pb.n))
    if res.out is None:
        return  # not rank 0
    summary = {
        "out": str(res.out),
        "quantized": len(res.quantized),
        "steps_run": res.steps_run,
        "tokens_per_s": round(res.tokens_per_s, 1),
        "history": res.history,
    }
    if as_json:
        click.echo(json.dumps(summary, indent=2))
    else:
        click.echo(f"{res.out}: {len(res.quantized)} quantized weights, {res.tokens_per_s:.0f} tokens/s")


COMMANDS = [train]
