"""What `matq inspect` reports, as data: per tensor, widths served, bytes each width reads, extra-bucket share."""

from __future__ import annotations

import math
from collections.abc import Callable

from . import constants as C
from . import numerics
from .checkpoint import Checkpoint
from .errors import MatqError


def human_bytes(n: float) -> str:
    """Sizes as the Hub shows them (decimal units)."""
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if abs(n) < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return str(n)


def describe(ckpt: Checkpoint, *, stats: bool = True, progress: Callable[[int], None] | None = None) -> dict:
    """A JSON-ready description of a checkpoint."""
    c = ckpt.code_bits
    widths = list(range(c, 0, -1))  # every width 1..c, as the planes serve them (int5 and int7 too)
    tensors = []
    totals = {str(r): 0 for r in widths}
    for name in ckpt.tensor_names():
        t = ckpt.info(name)
        row: dict = {"name": name, "kind": t.kind, "shape": list(t.shape), "dtype": t.dtype}
        if t.quantized:
            served = [r for r in widths if r <= t.max_width(c)]
            row.update(
                granularity=t.granularity,
                group_size=t.group_size,
                scheme=t.scheme,
                scale_dtype=t.scale_dtype,
                zero_dtype=t.zero_dtype,
                zero_point=t.zero_point,
                importance=ckpt.has_importance(name),
                sensitivity=ckpt.has_sensitivity(name),
                extra_precision=list(t.extra_precision),
                planes=list(t.planes),
                widths=served,
                bytes={str(r): ckpt.bytes_for_width(name, r) for r in served},
            )
            if stats and t.max_width(c) == c:
                q = ckpt.codes(name)
                row["extra_bucket_share"] = {
                    str(r): numerics.extra_bucket_share(q, c, r) for r in widths if r < c
                }
            for r in widths:
                if str(r) in row["bytes"]:
                    totals[str(r)] += row["bytes"][str(r)]
        else:
            row["bytes"] = ckpt.bytes_for_width(name, None)
            for r in widths:
                totals[str(r)] += row["bytes"]
        tensors.append(row)
        if progress:
            progress(1)
    served = _common_widths(ckpt, widths)
    return {
        "path": str(ckpt.path),
        "summary": _summary(ckpt, tensors, served, totals),
        "format_version": ckpt.version,
        "code_bits": c,
        "digest": ckpt.digest,
        "files": {
            ckpt.path.name: ckpt.path.stat().st_size,
            **{f: m["bytes"] for f, m in ckpt.manifest["files"].items()},
        },
        "carried": sorted(ckpt.manifest.get("carried", {})),
        "source": ckpt.source,
        "widths_served": served,
        "bytes_per_width": {str(r): totals[str(r)] for r in served},
        "checksums": {"entries": len(ckpt.manifest["entries"]), "checked": ckpt.checked_entries()},
        "tensors": tensors,
    }


def _common_widths(ckpt: Checkpoint, widths: list[int]) -> list[int]:
    """Widths every quantized tensor serves: what ``matq slice --bits`` and the exports accept."""
    c = ckpt.code_bits
    top = min((ckpt.info(n).max_width(c) for n in ckpt.quantized_names()), default=0)
    return [r for r in widths if r <= top]


def _summary(ckpt: Checkpoint, tensors: list[dict], served: list[int], totals: dict[str, int]) -> dict:
    """The first things a user asks: what model, how much of it is quantized, which widths it serves
    and what each costs over the whole model (bits per weight over every tensor's elements)."""
    numel = {t["name"]: math.prod(t["shape"]) for t in tensors}
    quantized = [t["name"] for t in tensors if t["kind"] == C.KIND_QUANTIZED]
    weights = sum(numel.values())
    tops = {ckpt.info(n).max_width(ckpt.code_bits) for n in quantized}
    src = ckpt.source
    try:
        cfg = ckpt.config or {}
    except MatqError:  # a carried config.json that is not JSON: `matq verify` says so; inspect goes on
        cfg = {}
    path = ckpt.path
    return {
        "model": src.get("model"),
        "checkpoint": path.parent.name if path.name == C.BASE_FILENAME else path.name,
        "config_name": cfg.get("_name_or_path") if isinstance(cfg.get("_name_or_path"), str) else None,
        "architecture": src.get("architecture") or src.get("model_type"),
        "layout": src.get("layout", "free") if quantized else None,
        "tensors": len(tensors),
        "quantized_tensors": len(quantized),
        "weights": weights,
        "quantized_weights": sum(numel[n] for n in quantized),
        "mixed_widths": len(tops) > 1,
        "importance_tensors": sum(ckpt.has_importance(n) for n in quantized),
        "sensitivity_tensors": sum(ckpt.has_sensitivity(n) for n in quantized),
        "bits_per_weight": {str(r): 8 * totals[str(r)] / weights for r in served} if weights else {},
    }

