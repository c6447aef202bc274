"""Quality against bits per weight, as a PNG (matplotlib, Agg): perplexity (log scale) above, mean KLD
to the reference below; one series per kind of source, every point labelled, the Pareto front (no
other point is both smaller and better) drawn through both panels, the reference as a dashed line."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

from matq_format.publish import OutputKind

SERIES = {
    "matq": ("matq width (transformers)", "o", "tab:blue"),
    "matq-plan": ("matq plan (transformers)", "s", "tab:cyan"),
    "gguf-matq": ("matq GGUF (llama.cpp)", "^", "tab:green"),
    "gguf": ("llama.cpp GGUF", "D", "tab:orange"),
    "onnx-matq": ("matq ONNX (onnxruntime)", "v", "tab:purple"),
    "onnx": ("ONNX (onnxruntime's quantizer)", "P", "tab:red"),
    "hf": ("Hugging Face folder", "x", "tab:gray"),
}
X_TICKS = (1, 2, 3, 4, 5, 6, 8, 10, 12, 16, 24, 32)


def is_png(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            return f.read(8) == b"\x89PNG\r\n\x1a\n"
    except OSError:
        return False


PNG_FILE = OutputKind("PNG image", False, is_png)


def pareto(points: Sequence[tuple[float, float]]) -> list[int]:
    """Indices of the points no other point beats on both x (smaller) and y (smaller), by x."""
    order = sorted(range(len(points)), key=lambda i: (points[i][0], points[i][1]))
    front, best = [], float("inf")
    for i in order:
        if points[i][1] < best:
            front.append(i)
            best = points[i][1]
    return front


def labels(names: Sequence[str]) -> list[str]:
    """Point labels: names without ``.gguf`` and without a prefix all share (up to a ``-``/``_``)."""
    short = [n.removesuffix(".gguf") for n in names]
    prefix = os.path.commonprefix(short) if len(short) > 1 else ""
    cut = max(prefix.rfind("-"), prefix.rfind("_")) + 1
    return [n[cut:] or n for n in short]


def plot(results, out: str | os.PathLike, title: str | None = None) -> None:
    """Write the PNG to ``out`` (results: :class:`matq_eval.Result` objects or their dicts)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import FuncFormatter, NullFormatter

    rows = [r if isinstance(r, dict) else r.to_dict() for r in results]
    ref = next((r for r in rows if r["kind"] == "reference"), None)
    pts = [r for r in rows if r["kind"] != "reference"]
    positive = [r["kld"] for r in pts if r["kld"] > 0]
    floor = min(positive) / 2 if positive else 1e-6  # a log axis has no 0: a KLD of 0 is drawn here
    kld = lambda r: max(r["kld"], floor)  # noqa: E731
    short = dict(zip((r["name"] for r in pts), labels([r["name"] for r in pts]), strict=True))
    fig, (ax_p, ax_k) = plt.subplots(2, 1, figsize=(9, 9), sharex=True, constrained_layout=True)
    for kind, (series, marker, color) in SERIES.items():
        sel = sorted((r for r in pts if r["kind"] == kind), key=lambda r: r["bits_per_weight"])
        if not sel:
            continue
        x = [r["bits_per_weight"] for r in sel]
        ax_p.plot(x, [r["ppl"] for r in sel], marker=marker, color=color, ls="none", label=series, ms=7)
        ax_k.plot(x, [kld(r) for r in sel], marker=marker, color=color, ls="none", ms=7)
        for r in sel:
            for ax, y in ((ax_p, r["ppl"]), (ax_k, kld(r))):
                ax.annotate(
                    short[r["name"]],
                    (r["bits_per_weight"], y),
                    textcoords="offset points",
                    xytext=(5, 4),
                    fontsize=7,
                )
    for ax, key in ((ax_p, "ppl"), (ax_k, "kld")):
        xy = [(r["bits_per_weight"], kld(r) if key == "kld" else r["ppl"]) for r in pts]
        front = pareto(xy)
        if len(front) > 1:
            ax.step(
                [xy[i][0] for i in front],
                [xy[i][1] for i in front],
                where="post",
                color="0.6",
                lw=1,
                zorder=0,
                label="Pareto front" if key == "ppl" else None,
            )
        ax.set_yscale("log")
        ax.grid(True, which="both", alpha=0.3)
    if ref is not None:
        ax_p.axhline(ref["ppl"], color="k", ls="--", lw=1, label=f"reference ({ref['ppl']:.4g})")
    fmt = FuncFormatter(lambda v, _: f"{v:.4g}")
    ppls = [r["ppl"] for r in rows]
    ax_p.yaxis.set_major_formatter(fmt)
    # minor ticks labelled only within a decade, where there are no major ones to read
    ax_p.yaxis.set_minor_formatter(fmt if ppls and max(ppls) < 10 * min(ppls) else NullFormatter())
    ax_k.set_xscale("log", base=2)
    xs = [r["bits_per_weight"] for r in pts] or [1.0]
    ticks = [t for t in X_TICKS if min(xs) / 1.2 <= t <= max(xs) * 1.2]
    ax_k.set_xticks(ticks or [round(xs[0])])
    ax_k.xaxis.set_major_formatter(fmt)
    ax_k.xaxis.set_minor_formatter(NullFormatter())
    ax_p.set_ylabel("perplexity")
    ax_k.set_ylabel("mean KLD to the reference (nats/token)")
    ax_k.set_xlabel("bits per weight (all tensors, as llama.cpp counts a file; log scale)")
    if ref is not None:
        ax_p.set_title(title or f"quality against size ({ref['tokens']} scored tokens)")
    ax_p.legend(fontsize=8)
    fig.savefig(out, format="png", dpi=120)
    plt.close(fig)
