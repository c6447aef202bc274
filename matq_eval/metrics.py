"""Perplexity, KL divergence to the reference and top-1 agreement, as llama.cpp's perplexity tool
reports them (``--kl-divergence``), computed in float64 from raw logits.

For each scored position ``t`` (logits predicting ``target[t]``):
- ``nll = -log_softmax(test)[target]``; perplexity is ``exp(mean nll)``;
- ``kld = sum_v p_ref(v) * (log p_ref(v) - log p_test(v))`` with ``p_ref = softmax(ref)``;
- top-1 agreement: ``argmax(ref) == argmax(test)``.
Means run over every scored position of every window, the same positions for all models.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

ROWS = 64
"""Positions processed at once: a few float64 [ROWS, vocab] temporaries (about 25 MB each at 49k vocab)."""


def log_softmax(x: np.ndarray) -> np.ndarray:
    """float64 log-softmax over the last axis."""
    x = np.asarray(x, dtype=np.float64)
    m = x.max(axis=-1, keepdims=True)
    z = x - m
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


@dataclass
class Sums:
    """Running sums over scored positions; ``+`` merges, ``ppl``/``kld``/``top1`` are the means."""

    nll: float = 0.0
    kld: float = 0.0
    top1: int = 0
    n: int = 0

    def __add__(self, other: Sums) -> Sums:
        return Sums(self.nll + other.nll, self.kld + other.kld, self.top1 + other.top1, self.n + other.n)

    @property
    def ppl(self) -> float:
        return math.exp(self.nll / self.n) if self.n else float("nan")

    @property
    def mean_kld(self) -> float:
        return self.kld / self.n if self.n else float("nan")

    @property
    def top1_rate(self) -> float:
        return self.top1 / self.n if self.n else float("nan")


def score(test: np.ndarray, targets: np.ndarray, ref: np.ndarray | None = None) -> Sums:
    """Sums for one window: ``test`` and ``ref`` logits ``[T, vocab]``, ``targets`` ``[T]``.

    Without ``ref`` (the reference scoring itself) KLD is 0 and top-1 agreement 1 by definition.
    """
    test = np.asarray(test)
    targets = np.asarray(targets)
    if test.ndim != 2 or test.shape[0] != targets.shape[0]:
        raise ValueError(f"logits {test.shape} do not match {targets.shape[0]} targets")
    if ref is not None and ref.shape != test.shape:
        raise ValueError(f"reference logits {ref.shape} and test logits {test.shape} differ in shape")
    out = Sums()
    for a in range(0, test.shape[0], ROWS):
        b = min(a + ROWS, test.shape[0])
        lt = log_softmax(test[a:b])
        nll = -float(lt[np.arange(b - a), targets[a:b]].sum())
        if ref is None:
            out += Sums(nll, 0.0, b - a, b - a)
            continue
        lr = log_softmax(ref[a:b])
        kld = float((np.exp(lr) * (lr - lt)).sum())
        top1 = int(np.count_nonzero(np.argmax(ref[a:b], axis=-1) == np.argmax(test[a:b], axis=-1)))
        out += Sums(nll, kld, top1, b - a)
    return out
