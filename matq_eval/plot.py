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


Box = tuple[float, float, float, float]
"""x0, y0, x1, y1, in points."""


def _overlap(a: Box, b: Box) -> float:
    w = min(a[2], b[2]) - max(a[0], b[0])
    h = min(a[3], b[3]) - max(a[1], b[1])
    return w * h if w > 0 and h > 0 else 0.0


def nudge(
    points: Sequence[tuple[float, float]], sizes: Sequence[tuple[float, float]], marker: float = 4.0
) -> list[tuple[float, float]]:
    """Offsets (points) for the labels of ``points`` (display positions, in points) of ``sizes``
    (width, height, in points), so that no label covers another or a marker: each label, in the
    order of its point's x, takes the first free place of a few around its point (right and above
    first, then below, left, and further up or down); where none is free, the least covered one."""
    markers = [(x - marker, y - marker, x + marker, y + marker) for x, y in points]
    placed: list[Box] = []
    out: list[tuple[float, float]] = [(5.0, 4.0)] * len(points)
    for i in sorted(range(len(points)), key=lambda i: points[i]):
        (x, y), (w, h) = points[i], sizes[i]
        tries = [
            (dx, dy)
            for step in range(6)
            for dx in (5.0, -5.0 - w)
            for dy in (4.0 + step * (h + 2), -4.0 - h - step * (h + 2))
        ]
        best, best_cost = tries[0], float("inf")
        for dx, dy in tries:
            box = (x + dx, y + dy, x + dx + w, y + dy + h)
            cost = sum(_overlap(box, b) for b in placed) + sum(_overlap(box, m) for m in markers)
            if cost < best_cost:
                best, best_cost = (dx, dy), cost
            if cost == 0:
                break
        out[i] = best
        placed.append((x + best[0], y + best[1], x + best[0] + w, y + best[1] + h))
    return out


def _annotate(fig, ax, xy: list[tuple[float, float]], texts: list[str], fontsize: float) -> None:
    """Every label beside its point, nudged off the others (:func:`nudge`) once the axes are laid out."""
    fig.canvas.draw()  # scales, limits and the layout fixed: display positions are final
    to_pt = 72.0 / fig.dpi
    pts = [tuple(v * to_pt for v in ax.transData.transform(p)) for p in xy]
    sizes = [(0.6 * fontsize * len(t), 1.2 * fontsize) for t in texts]
    for t, p, off in zip(texts, xy, nudge(pts, sizes), strict=True):
        ax.annotate(t, p, textcoords="offset points", xytext=off, fontsize=fontsize)


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
    names = [short[r["name"]] for r in pts]
    _annotate(fig, ax_p, [(r["bits_per_weight"], r["ppl"]) for r in pts], names, 7)
    _annotate(fig, ax_k, [(r["bits_per_weight"], kld(r)) for r in pts], names, 7)
    fig.savefig(out, format="png", dpi=120)
    plt.close(fig)
