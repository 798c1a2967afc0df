"""Combining the schools' answer sets into one target the teacher learns from (teach rounds).
Pure functions on [questions, options] probability tensors; zero columns are absent options.

- mean: uniform average (one school's vote weighs 1/K);
- weighted: average weighted by each school's last held-out accuracy (a better school counts
  more; self-reported, so use it only with schools you trust);
- trimmed_mean: per question and option, drop the ⌊trim·K⌋ highest and lowest values, average
  the rest, renormalise; a minority of poisoned schools cannot move the target far;
- median: per question and option, the median, renormalised; the most robust, the noisiest.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import torch

RULES = ("mean", "weighted", "trimmed_mean", "median")


def _renormalise(x: torch.Tensor, support: torch.Tensor) -> torch.Tensor:
    x = torch.where(support, x.clamp(min=0), torch.zeros_like(x))
    total = x.sum(-1, keepdim=True)
    uniform = support.float() / support.float().sum(-1, keepdim=True).clamp(min=1)
    return torch.where(total > 0, x / total.clamp(min=1e-12), uniform)


def ensemble(answers: Mapping[str, torch.Tensor], support: torch.Tensor, rule: str = "trimmed_mean",
             trim: float = 0.2, weights: Mapping[str, float] | None = None) -> torch.Tensor:
    """One [questions, options] target from the schools' answer sets. `support` marks the real
    options (True) of each question."""
    if rule not in RULES:
        raise ValueError(f"unknown ensemble rule {rule!r}; choose from {RULES}")
    if not answers:
        raise ValueError("no answer sets to ensemble")
    names = sorted(answers)
    stack = torch.stack([answers[n].float() for n in names])       # [K, questions, options]
    k = len(names)
    if rule == "mean":
        out = stack.mean(0)
    elif rule == "weighted":
        w = torch.tensor([max(0.0, float((weights or {}).get(n, 1.0))) for n in names])
        if float(w.sum()) <= 0:
            w = torch.ones(k)
        out = (stack * (w / w.sum())[:, None, None]).sum(0)
    elif rule == "trimmed_mean":
        if not 0 <= trim < 0.5:
            raise ValueError("trim must be in [0, 0.5)")
        cut = int(math.floor(trim * k))
        ordered = stack.sort(0).values
        out = ordered[cut:k - cut].mean(0)
    else:
        out = stack.median(0).values if k % 2 else stack.sort(0).values[k // 2 - 1:k // 2 + 1].mean(0)
    return _renormalise(out, support)
