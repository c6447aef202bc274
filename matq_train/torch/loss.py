"""The MatQuant objective (:mod:`matq_train.objective`) evaluated in torch, one width at a time.

:meth:`MatQuantStep.forward` runs one :class:`~matq_train.objective.Term` (one width) and returns
its weighted loss, so the trainer can call ``backward`` after each width: only one width's
activations are alive at a time, and a teacher's logits are kept (detached) only until its
students have run. Called without a term it runs them all in one graph (the reference the tests
compare with).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..objective import IGNORE, Objective
from .fakequant import width

__all__ = ["MatQuantStep", "token_nll"]


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
    """One width's (or one step's) loss as a module, so DDP/FSDP see a forward for each backward.

    Losses are summed over scored tokens and divided by ``denom`` (the global number of scored
    tokens divided by the world size, so DDP's gradient averaging gives the global mean).
    """

    def __init__(self, model: nn.Module, objective: Objective, causal: bool = True):
        super().__init__()
        self.model = model
        self.objective = objective
        self.causal = causal
        self.terms = objective.terms()

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor,
        attention_mask: torch.Tensor | None = None,
        denom: float | None = None,
        term: int | None = None,
        teachers: dict[int, torch.Tensor] | None = None,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """``term=i``: width i's weighted loss and its unweighted loss per token (detached); a teacher
        width stores its detached logits in ``teachers``. ``term=None``: the whole step,
        ``(total, per-width losses)``."""
        if term is not None:
            return self._term(
                self.terms[term],
                input_ids,
                labels,
                attention_mask,
                denom,
                {} if teachers is None else teachers,
            )
        kept: dict[int, torch.Tensor] = {}
        total = torch.zeros((), dtype=torch.float32, device=input_ids.device)
        per = []
        for t in self.terms:
            value, nll = self._term(t, input_ids, labels, attention_mask, denom, kept)
            total = total + value
            per.append(nll)
        return total, torch.stack(per)

    def _term(
        self, t, input_ids, labels, attention_mask, denom, teachers
    ) -> tuple[torch.Tensor, torch.Tensor]:
        with width(self.model, t.bits, self.objective.extra_precision):
            out = self.model(input_ids=input_ids, attention_mask=attention_mask).logits
        if t.keep:
            teachers[t.bits] = out.detach()
        nll, n = token_nll(out, labels, self.causal)
        n_f = n.clamp_min(1).to(torch.float32)
        value = torch.zeros((), dtype=torch.float32, device=out.device)
        if t.teacher is not None:
            value = value + _kl_sum(out, teachers[t.teacher], labels, self.causal)
        if t.labels:
            value = value + nll
        return t.weight * value / (n_f if denom is None else denom), (nll / n_f).detach()
