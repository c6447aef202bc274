"""The MatQuant objective (Eq. 7): ``sum_r lambda_r * loss_r``, one model run per width.

``loss_r`` is the next-token (causal LM) or masked-token (masked LM) cross-entropy of the model
with its selected weights sliced to ``r`` bits. Co-distillation ``T->S`` replaces the target of
width S by the output distribution of width T (detached), as in the paper's ``[8, 4, 8->2]``;
with ``distill_labels`` the student keeps its ground-truth term too, weighted equally (the
paper's ``[8, 4, 2, 8->2]``).
Extra precision drops the slice clamp at every width below ``c``. A single-width baseline is the
objective with one width and ``c = r``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from matq_format.errors import MatqError

from .fakequant import width

__all__ = ["Objective", "ObjectiveError", "MatQuantStep", "parse_bits", "parse_distill", "token_nll"]

IGNORE = -100


class ObjectiveError(MatqError):
    """Widths, weights or distillation pairs that do not fit together."""

    hint = "e.g. --bits 8,4,2 --lambdas 0.1,0.1,1 --distill '8->2'"


def parse_bits(text: str | list[int] | tuple[int, ...]) -> tuple[int, ...]:
    """``"8,4,2"`` -> ``(8, 4, 2)``, widest first, no duplicates."""
    vals = [int(v) for v in (text.split(",") if isinstance(text, str) else text) if str(v).strip()]
    if not vals or len(set(vals)) != len(vals):
        raise ObjectiveError(None, f"bits {text!r}: give distinct widths such as 8,4,2")
    return tuple(sorted(vals, reverse=True))


def parse_distill(text: str | None) -> dict[int, int]:
    """``"8->2"`` or ``"8->2,8->4"`` -> ``{student: teacher}``."""
    out: dict[int, int] = {}
    for part in (text or "").split(","):
        part = part.strip()
        if not part:
            continue
        m = re.fullmatch(r"(\d+)\s*->\s*(\d+)", part)
        if not m:
            raise ObjectiveError(None, f"distill {part!r}: write TEACHER->STUDENT, e.g. 8->2")
        t, s = int(m[1]), int(m[2])
        if t <= s or s in out:
            raise ObjectiveError(
                None, f"distill {part!r}: the teacher must be wider, one teacher per student"
            )
        out[s] = t
    return out


@dataclass(frozen=True)
class Objective:
    """Widths (widest first), their weights, distillation pairs and the extra-precision flag.

    No widths at all means plain full-precision training.
    """

    bits: tuple[int, ...]
    lambdas: tuple[float, ...]
    distill: dict[int, int] = field(default_factory=dict)
    extra_precision: bool = False
    distill_labels: bool = False

    @classmethod
    def build(
        cls,
        bits,
        lambdas=None,
        distill: str | dict[int, int] | None = None,
        extra_precision: bool = False,
        distill_labels: bool = False,
    ) -> Objective:
        b = parse_bits(bits)
        if lambdas is None or lambdas == "":
            lam = (1.0,) * len(b)
        else:
            raw = [float(v) for v in (lambdas.split(",") if isinstance(lambdas, str) else lambdas)]
            if len(raw) != len(b):
                raise ObjectiveError(
                    None, f"{len(raw)} lambdas for {len(b)} widths; give one per width, in --bits order"
                )
            given = [int(v) for v in (bits.split(",") if isinstance(bits, str) else bits)]
            by_width = dict(zip(given, raw, strict=True))
            lam = tuple(by_width[r] for r in b)
            if any(v < 0 for v in lam) or not any(v > 0 for v in lam):
                raise ObjectiveError(None, "lambdas must be non-negative and not all zero")
        d = parse_distill(distill) if not isinstance(distill, dict) else dict(distill)
        for s, t in d.items():
            if s not in b or t not in b:
                raise ObjectiveError(
                    None, f"distill {t}->{s}: both widths must be in --bits {','.join(map(str, b))}"
                )
        if distill_labels and not d:
            raise ObjectiveError(None, "distill_labels needs a distillation pair such as 8->2")
        return cls(b, lam, d, bool(extra_precision), bool(distill_labels))

    def to_json(self) -> dict:
        return {
            "bits": list(self.bits),
            "lambdas": list(self.lambdas),
            "distill": [f"{t}->{s}" for s, t in sorted(self.distill.items())],
            "extra_precision": self.extra_precision,
            "distill_labels": self.distill_labels,
        }


def token_nll(logits: torch.Tensor, labels: torch.Tensor, causal: bool) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed cross-entropy (nats) over the scored tokens, and their count."""
    if causal:
        logits, labels = logits[:, :-1], labels[:, 1:]
    flat = labels.reshape(-1)
    nll = F.cross_entropy(
        logits.reshape(-1, logits.shape[-1]).float(), flat, ignore_index=IGNORE, reduction="sum"
    )
    return nll, (flat != IGNORE).sum()


def _kl_sum(student: torch.Tensor, teacher: torch.Tensor, labels: torch.Tensor, causal: bool) -> torch.Tensor:
    """Summed KL(teacher || student) over the scored positions; the teacher is detached."""
    if causal:
        student, teacher, labels = student[:, :-1], teacher[:, :-1], labels[:, 1:]
    keep = labels.reshape(-1) != IGNORE
    s = F.log_softmax(student.reshape(-1, student.shape[-1]).float()[keep], dim=-1)
    t = F.log_softmax(teacher.reshape(-1, teacher.shape[-1]).float()[keep].detach(), dim=-1)
    return (t.exp() * (t - s)).sum()


class MatQuantStep(nn.Module):
    """One training step's loss as a module, so DDP/FSDP see a single forward per backward.

    ``forward`` returns ``(total, per_width)``: the weighted sum normalised by ``denom`` (the
    global number of scored tokens divided by the world size, so DDP's gradient averaging gives the
    global mean), and each width's unweighted loss per token on this rank, detached.
    """

    def __init__(self, model: nn.Module, objective: Objective, causal: bool = True):
        super().__init__()
        self.model = model
        self.objective = objective
        self.causal = causal

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        denom: float | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        obj = self.objective
        logits: dict[int, torch.Tensor] = {}
        total = torch.zeros((), dtype=torch.float32, device=input_ids.device)
        per = []
        teachers = set(obj.distill.values())
        # No widths: plain full-precision training (the speed reference, and pretraining).
        for r, lam in zip(obj.bits or (None,), obj.lambdas or (1.0,), strict=True):
            with width(self.model, r, obj.extra_precision):
                out = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
            if r in teachers:
                logits[r] = out.detach()
            nll, n = token_nll(out, labels, self.causal)
            n_f = n.clamp_min(1).to(torch.float32)
            if r in obj.distill:
                term = _kl_sum(out, logits[obj.distill[r]], labels, self.causal)
                if obj.distill_labels:
                    term = term + nll
            else:
                term = nll
            total = total + lam * term / (n_f if denom is None else denom)
            per.append((nll / n_f).detach())
        return total, torch.stack(per)
