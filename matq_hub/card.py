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
    name = repo_id.split("/")[-1]
    small = widths[-1] if widths else ckpt.code_bits
    lines = [
        "---",
        ModelCardData(**meta).to_yaml(),
        "---",
        *_intro(ckpt, name, meta.get("base_model")),
        *_width_section(rows),
        *_pull_section(rows, repo_id, name),
        *_convert_section(name, widths, small),
        *(_exports_section(repo_id, exports) if exports else []),
        *_checkpoint_section(ckpt),
    ]
    return str(ModelCard("\n".join(lines)))


def _intro(ckpt: Checkpoint, name: str, base: str | None) -> list[str]:
    """The title and what the checkpoint holds (and of which base model, where known)."""
    names = ckpt.quantized_names()
    weights = sum(ckpt.info(n).numel for n in names)
    of = f" of [{base}](https://huggingface.co/{base})" if base else ""
    return [
        "",
        f"# {name}",
        "",
        f"A [Matryoshka-quantized](https://arxiv.org/abs/2502.06786) checkpoint in the matq format (spec v1){of}"
        f": {len(names)} tensors ({weights:,} weights) hold {ckpt.code_bits}-bit integer codes stored "
        "as bit-planes, one file per plane. A width-r model reads the top r planes plus one rounding "
        "plane, so each user downloads only the planes of the width they serve.",
    ]


def _width_section(rows: list[WidthOffer]) -> list[str]:
    """The table of widths: files, download size, share of the full download, bits per weight."""
    full = max((r.download_bytes for r in rows), default=0)
    table = [
        f"| {r.label} | {r.files} | {human_bytes(r.download_bytes)} "
        f"| {(r.download_bytes / full if full else 1.0):.0%} | {r.bits_per_weight:.3f} |"
        for r in rows
    ]
    return [
        "",
        "## Widths on offer",
        "",
        "| width | files | download | share of full | bits per weight |",
        "|---|---|---|---|---|",
        *table,
        "",
        "Bits per weight count the codes, scales, zero points and (with extra precision) the extra "
        "bucket; unquantized tensors are not counted. Any narrower width can also be served from a "
        "wider download.",
    ]


def _pull_section(rows: list[WidthOffer], repo_id: str, name: str) -> list[str]:
    """One ``matq pull`` line per width on offer, and a Mix'n'Match plan."""
    pulls = [
        f"matq pull {repo_id} --bits {r.bits}{' --extra-precision' if r.extra_precision else ''} "
        f"-o {name}-int{r.bits}{'ep' if r.extra_precision else ''}"
        for r in rows
    ]
    return [
        "",
        "## Pull one width",
        "",
        "```bash",
        'pip install "matq[hub]"',
        *pulls,
        f"matq pull {repo_id} --plan pyramid -o {name}-mnm      # Mix'n'Match: int2 at both ends, int8 in the middle",
        "```",
        "",
        "`matq pull` fetches the files through `huggingface_hub` and its cache, checks every CRC-32 and "
        "sha256 the manifest records, and writes a checkpoint holding only the planes that width needs. "
        "`--revision` pins a branch, tag or commit.",
    ]


def _convert_section(name: str, widths: list[int], small: int) -> list[str]:
    """How to convert a pulled folder (int4 and int2 where offered) and read it from Python."""
    conv = [r for r in (4, 2) if r in widths] or [small]
    return [
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


def _exports_section(repo_id: str, exports: dict[str, int]) -> list[str]:
    """The exported files uploaded beside the checkpoint, and how to download one."""
    return [
        "",
        "## Exports",
        "",
        "Files made from this checkpoint, uploaded alongside it:",
        "",
        "| file | size |",
        "|---|---|",
        *(f"| `{p}` | {human_bytes(b)} |" for p, b in sorted(exports.items())),
        "",
        "```python",
        "from huggingface_hub import hf_hub_download",
        f'path = hf_hub_download("{repo_id}", "{sorted(exports)[0]}")',
        "```",
    ]


def _checkpoint_section(ckpt: Checkpoint) -> list[str]:
    """Format version, digest and carried files: what names this exact checkpoint."""
    carried = ", ".join(f"`{f}`" for f in sorted(ckpt.manifest.get("carried", {}))) or "none"
    return [
        "",
        "## Checkpoint",
        "",
        f"- format: matq {ckpt.version}, code bits {ckpt.code_bits}",
        f"- digest (sha256 of the manifest): `{ckpt.digest}`",
        f"- carried files: {carried}",
        "",
    ]
