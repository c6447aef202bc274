"""The MatQuant objective (Eq. 7), framework-neutral: ``sum_r lambda_r * loss_r``, one model run per width.

``loss_r`` is the next-token (causal LM) or masked-token (masked LM) cross-entropy of the model
with its selected weights sliced to ``r`` bits. Co-distillation ``T->S`` replaces the target of
width S by the output distribution of width T (detached), as in the paper's ``[8, 4, 8->2]``;
with ``distill_labels`` the student keeps its ground-truth term too, weighted equally (the
paper's ``[8, 4, 2, 8->2]``).
Extra precision drops the slice clamp at every width below ``c``. A single-width baseline is the
objective with one width and ``c = r``. The backends (``matq_train.torch``, ``matq_train.jax``)
evaluate it; this module only says what it is and checks it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field

from matq_format.errors import MatqError

__all__ = ["IGNORE", "Objective", "ObjectiveError", "Term", "parse_bits", "parse_distill"]

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
class Term:
    """One model run of a step: its width (None: full precision), weight, and what it is scored against.

    ``teacher``: the width whose detached output distribution is the target (KL), or None;
    ``labels``: whether the ground-truth cross-entropy is part of the term; ``keep``: whether this
    width's logits are kept (detached) because a later term learns from them.
    """

    bits: int | None
    weight: float
    teacher: int | None
    labels: bool
    keep: bool


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

    def labels(self) -> dict[str, int | None]:
        """The name every backend logs each width under (``int8`` -> 8), or ``fp`` -> None for full precision."""
        return {f"int{r}": r for r in self.bits} if self.bits else {"fp": None}

    def terms(self) -> tuple[Term, ...]:
        """The runs of one step, widest first (teachers run before their students); every backend follows it."""
        if not self.bits:
            return (Term(None, 1.0, None, True, False),)
        teachers = set(self.distill.values())
        return tuple(
            Term(
                r,
                lam,
                self.distill.get(r),
                r not in self.distill or self.distill_labels,
                r in teachers,
            )
            for r, lam in zip(self.bits, self.lambdas, strict=True)
        )
