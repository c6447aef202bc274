"""The model card ``matq push`` writes: Hub metadata plus what each width costs to download and serve.

The YAML front matter is built with ``huggingface_hub.ModelCardData`` so the Hub reads it as it reads
any card: ``library_name: matq``, tags, and, when the checkpoint records them, ``base_model`` (with
``base_model_relation: quantized``) and ``license``. They come from the manifest's ``source`` record
(``base_model``, ``license``), else from the carried ``config.json`` (``_name_or_path`` when it is a
Hub id, ``license``); a carried LICENSE file without a license id gives ``license: other``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from matq_format import constants as C
from matq_format.checkpoint import Checkpoint
from matq_format.inspect import human_bytes
from matq_format.plans import summarize

from .layout import file_bytes, needed_files

HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
LICENSE_FILES = ("LICENSE", "LICENSE.txt", "LICENSE.md")


@dataclass(frozen=True)
class WidthOffer:
    """One row of the card's width table."""

    bits: int
    extra_precision: bool
    files: int
    download_bytes: int
    bits_per_weight: float

    @property
    def label(self) -> str:
        return f"int{self.bits}" + (" + extra precision" if self.extra_precision else "")


def offered_widths(ckpt: Checkpoint) -> list[int]:
    """Uniform widths every quantized tensor of this checkpoint can serve, widest first."""
    c = ckpt.code_bits
    candidates = [r for r in C.SLICE_WIDTHS if r <= c] if c == C.DEFAULT_CODE_BITS else list(range(c, 1, -1))
    names = ckpt.quantized_names()
    top = min((ckpt.info(n).max_width(c) for n in names), default=c)
    return [r for r in candidates if r <= top]


def width_table(ckpt: Checkpoint, base_bytes: int) -> list[WidthOffer]:
    """Download size and served bits per weight of each width on offer (extra precision where trained)."""
    names = ckpt.quantized_names()
    sizes = file_bytes(ckpt, base_bytes)
    ep_widths = {r for n in names for r in ckpt.info(n).extra_precision}
    rows = []
    for r in offered_widths(ckpt):
        widths = dict.fromkeys(names, r)
        files = needed_files(ckpt, widths)
        dl = sum(sizes[f] for f in files)
        for ep in (False, True) if r in ep_widths else (False,):
            bpw = summarize(ckpt, widths, ep).bits_per_weight if names else 0.0
            rows.append(WidthOffer(r, ep, len(files), dl, bpw))
    return rows


def card_metadata(ckpt: Checkpoint, widths: list[int]) -> dict:
    """Front-matter fields: library, tags, and base model and license where the checkpoint knows them."""
    src = ckpt.source or {}
    cfg = ckpt.config or {}
    meta: dict = {"library_name": "matq"}
    base = src.get("base_model")
    if not base and isinstance(cfg.get("_name_or_path"), str) and HUB_ID_RE.fullmatch(cfg["_name_or_path"]):
        base = cfg["_name_or_path"]
    if base:
        meta["base_model"] = base
        meta["base_model_relation"] = "quantized"
    lic = src.get("license") or cfg.get("license")
    carried = ckpt.manifest.get("carried", {})
    if lic:
        meta["license"] = lic
    elif any(f in carried for f in LICENSE_FILES):
        meta["license"] = "other"
        meta["license_link"] = next(f for f in LICENSE_FILES if f in carried)
    tags = ["matq", "matryoshka-quantization", "quantized", *(f"int{r}" for r in widths)]
    if any(ckpt.info(n).extra_precision for n in ckpt.quantized_names()):
        tags.append("extra-precision")
    if src.get("model_type") or cfg.get("model_type"):
        tags.append(str(src.get("model_type") or cfg.get("model_type")))
    meta["tags"] = tags
    return meta


def render_card(
    ckpt: Checkpoint, repo_id: str, *, base_bytes: int, exports: dict[str, int] | None = None
) -> str:
    """The README.md for a pushed checkpoint (deterministic: pushing the same files twice is a no-op)."""
    from huggingface_hub import ModelCard, ModelCardData

    rows = width_table(ckpt, base_bytes)
    widths = [r.bits for r in rows if not r.extra_precision]
    meta = card_metadata(ckpt, widths)
    data = ModelCardData(**meta)
    name = repo_id.split("/")[-1]
    names = ckpt.quantized_names()
    weights = sum(ckpt.info(n).numel for n in names)
    full = max((r.download_bytes for r in rows), default=0)
    small = widths[-1] if widths else ckpt.code_bits
    conv = [r for r in (4, 2) if r in widths] or [small]
    lines = [
        "---",
        data.to_yaml(),
        "---",
        "",
        f"# {name}",
        "",
        "A [Matryoshka-quantized](https://arxiv.org/abs/2502.06786) checkpoint in the matq format (spec v1)"
        + (
            f" of [{meta['base_model']}](https://huggingface.co/{meta['base_model']})"
            if "base_model" in meta
            else ""
        )
        + f": {len(names)} tensors ({weights:,} weights) hold {ckpt.code_bits}-bit integer codes stored "
        "as bit-planes, one file per plane. A width-r model reads the top r planes plus one rounding "
        "plane, so each user downloads only the planes of the width they serve.",
        "",
        "## Widths on offer",
        "",
        "| width | files | download | share of full | bits per weight |",
        "|---|---|---|---|---|",
    ]
    for r in rows:
        share = r.download_bytes / full if full else 1.0
        lines.append(
            f"| {r.label} | {r.files} | {human_bytes(r.download_bytes)} | {share:.0%} | {r.bits_per_weight:.3f} |"
        )
    lines += [
        "",
        "Bits per weight count the codes, scales, zero points and (with extra precision) the extra "
        "bucket; unquantized tensors are not counted. Any narrower width can also be served from a "
        "wider download.",
        "",
        "## Pull one width",
        "",
        "```bash",
        'pip install "matq[hub]"',
    ]
    for r in rows:
        ep = " --extra-precision" if r.extra_precision else ""
        suffix = "ep" if r.extra_precision else ""
        lines.append(f"matq pull {repo_id} --bits {r.bits}{ep} -o {name}-int{r.bits}{suffix}")
    lines += [
        f"matq pull {repo_id} --plan pyramid -o {name}-mnm      # Mix'n'Match: int2 at both ends, int8 in the middle",
        "```",
        "",
        "`matq pull` fetches the files through `huggingface_hub` and its cache, checks every CRC-32 and "
        "sha256 the manifest records, and writes a checkpoint holding only the planes that width needs. "
        "`--revision` pins a branch, tag or commit.",
        "",
        "## Convert",
        "",
        "A pulled folder is a complete matq checkpoint: read it with `matq_format`, or convert it "
        "(`matq convert --help` lists the targets):",
        "",
        "```bash",
        *(f"matq convert {name}-int{r} --to gguf --bits {r} -o {name}-int{r}.gguf" for r in conv),
        "```",
        "",
        "```python",
        "import matq_format as mf",
        f'ckpt = mf.open("{name}-int{small}")',
        f"w = ckpt.dequantize(ckpt.quantized_names()[0], bits={small})   # float32",
        "```",
    ]
    if exports:
        lines += [
            "",
            "## Exports",
            "",
            "Files made from this checkpoint, uploaded alongside it:",
            "",
            "| file | size |",
            "|---|---|",
        ]
        lines += [f"| `{p}` | {human_bytes(b)} |" for p, b in sorted(exports.items())]
        first = sorted(exports)[0]
        lines += [
            "",
            "```python",
            "from huggingface_hub import hf_hub_download",
            f'path = hf_hub_download("{repo_id}", "{first}")',
            "```",
        ]
    lines += [
        "",
        "## Checkpoint",
        "",
        f"- format: matq {ckpt.version}, code bits {ckpt.code_bits}",
        f"- digest (sha256 of the manifest): `{ckpt.digest}`",
        f"- carried files: {', '.join(f'`{f}`' for f in sorted(ckpt.manifest.get('carried', {}))) or 'none'}",
        "",
    ]
    return str(ModelCard("\n".join(lines)))
