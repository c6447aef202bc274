"""`matq eval`: perplexity, KLD and top-1 agreement to a float reference (thin wrapper over matq_eval)."""

from __future__ import annotations

import json
import os
import warnings
from pathlib import Path

import click

from ..params import PathArg
from ..progress import bar


def _table(results) -> str:
    head = ("name", "kind", "MiB", "bits/w", "linear b/w", "ppl", "KLD", "top-1", "s")
    rows = [
        (
            r.name,
            r.kind,
            f"{r.bytes / 2**20:.1f}",
            f"{r.bits_per_weight:.3f}",
            f"{r.linear_bits_per_weight:.3f}",
            f"{r.ppl:.4f}",
            f"{r.kld:.5f}",
            f"{100 * r.top1:.2f}%",
            f"{r.seconds:.1f}",
        )
        for r in results
    ]
    widths = [max(len(x[i]) for x in [head, *rows]) for i in range(len(head))]
    line = lambda cells: "  ".join(  # noqa: E731
        c.ljust(w) if i < 2 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
    )
    tokens = results[0].tokens if results else 0
    return "\n".join([line(head), *map(line, rows), f"({tokens} scored tokens)"])


class _Bars:
    """One tqdm bar per model, replaced when the next one starts."""

    def __init__(self):
        self.name = None
        self.bar = None

    def __call__(self, name: str, done: int, total: int) -> None:
        if name != self.name:
            self.close()
            self.name, self.bar = name, bar(total, name, "window")
        self.bar.n = done
        self.bar.refresh()

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()
            self.bar = None


@click.command(
    "eval",
    epilog="""\b
Examples:
  matq eval ./SmolLM2-hf --text docs/ ./smol-matq@8,4,3,2
  matq eval ./SmolLM2-hf --text docs/ ./smol-matq@2+ep ./smol-matq@plan:pyramid --json
  matq eval ./SmolLM2-hf --text eval.txt smol-Q4_K_M.gguf smol-int4.gguf --plot pareto.png
  matq eval ./SmolLM2-hf --text docs/ ./smol-matq@4 --ctx 1024 --max-tokens 65536

\b
Every model (the reference, then each candidate) runs over all the tokens read: the time grows with
--max-tokens (default 4,096: 8 windows of 512, as the tables in docs/results.md) times the number
of models. Raise it for finer figures.
Candidates: FILE.gguf (llama.cpp), CKPT@R[,R...][+ep] (matq widths in transformers),
CKPT@plan:SPEC[+ep] (a Mix'n'Match plan, as `matq slice --plan`), an ONNX folder (a decoder with a
past cache, as `matq convert --to onnx` or onnxruntime-genai's builder writes it; onnxruntime), or
another HF folder.
Text: a file, or a folder's files (sorted; binary ones skipped), read as UTF-8, tokenized with the
reference's tokenizer, cut into windows of --ctx tokens. As llama.cpp's perplexity tool, the
predictions of the second half of every window are scored, so each has at least ctx/2 tokens of
context. The reference runs once; its logits wait in a temporary file (float32,
windows x ctx/2 x vocab x 4 bytes: 0.4 GB for 4,096 tokens of a 49k vocabulary) in --cache-dir.
""",
)
@click.argument("reference", type=PathArg())
@click.argument("candidates", nargs=-1)
@click.option(
    "--text",
    "texts",
    required=True,
    multiple=True,
    type=PathArg(),
    help="Evaluation text: a file or a folder (repeat to add more).",
)
@click.option("--ctx", type=click.IntRange(2), default=512, show_default=True, help="Tokens per window.")
@click.option(
    "--max-tokens",
    type=click.IntRange(2),
    default=4096,
    show_default=True,
    help="Tokens read from the text at most (whole windows); the run's time grows with it.",
)
@click.option(
    "--first",
    type=click.IntRange(0),
    default=None,
    help="First scored position in each window (default ctx/2, as llama.cpp; 0 scores every prediction).",
)
@click.option("--threads", type=click.IntRange(1, 256), default=None, help="CPU threads (default: all).")
@click.option(
    "--cache-dir",
    type=click.Path(path_type=Path, file_okay=False),
    default=None,
    help="Folder for the reference logits (default: the system's temporary folder).",
)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable results on stdout.")
@click.option(
    "--plot", "plot_out", type=PathArg(), help="Write a PNG of quality against bits."
)
@click.option("--force", is_flag=True, help="Replace the --plot file if it exists.")
def eval_cmd(
    reference: Path,
    candidates: tuple[str, ...],
    texts: tuple[Path, ...],
    ctx: int,
    max_tokens: int,
    first: int | None,
    threads: int | None,
    cache_dir: Path | None,
    as_json: bool,
    plot_out: Path | None,
    force: bool,
) -> None:
    """Perplexity, KL divergence and top-1 agreement to REFERENCE (a float HF folder) for matq widths,
    plans, GGUF files and ONNX folders, with bits per weight beside each.

    Minutes per model on a CPU: every model runs over all --max-tokens tokens (docs/eval.md has a
    measured run)."""
    import contextlib

    from matq_converters.text import SkippedFilesWarning
    from matq_eval import evaluate
    from matq_eval.plot import PNG_FILE, plot
    from matq_format.publish import AtomicOutput

    if not os.environ.get("MATQ_DEBUG"):  # transformers' loading bars and notes, one per model
        import transformers

        transformers.utils.logging.set_verbosity_error()
        transformers.utils.logging.disable_progress_bar()
    inputs = [reference, *texts, *(c.rpartition("@")[0] or c for c in candidates)]
    with contextlib.ExitStack() as stack:
        out = None
        if plot_out is not None:  # checked and locked before the long run, published after it
            out = stack.enter_context(AtomicOutput(plot_out, PNG_FILE, inputs=inputs, overwrite=force))
        bars = _Bars()
        stack.callback(bars.close)
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", SkippedFilesWarning)
            try:
                results = evaluate(
                    reference,
                    list(candidates),
                    list(texts),
                    ctx=ctx,
                    max_tokens=max_tokens,
                    first=first,
                    threads=threads,
                    cache_dir=cache_dir,
                    progress=bars,
                )
            finally:
                bars.close()
                for w in caught:  # said once, after the bars
                    if issubclass(w.category, SkippedFilesWarning):
                        click.echo(f"matq: warning: {w.message}", err=True)
                    else:
                        warnings.showwarning(w.message, w.category, w.filename, w.lineno)
        if out is not None:
            plot(results, out.tmp)
            out.commit()
    if as_json:
        doc = {
            "reference": str(reference),
            "ctx": ctx,
            "first": ctx // 2 if first is None else first,
            "results": [r.to_dict() for r in results],
        }
        if plot_out is not None:
            doc["plot"] = str(plot_out)
        click.echo(json.dumps(doc, indent=2))
    else:
        click.echo(_table(results))
        if plot_out is not None:
            click.echo(f"plot: {plot_out}")


COMMANDS = [eval_cmd]
