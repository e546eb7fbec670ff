"""How a policy's networks become one preference per action (torch only, no d3rlpy).

Two rules, shared by the trained d3rlpy policy (:class:`~addiffusion.offline_rl.policy.
OfflinePolicy`), its plain-torch / ONNX export (:func:`~addiffusion.offline_rl.policy.
scores_module`) and the policy packages (:class:`~addiffusion.policy.package.AdaptivePolicy`), so
that all of them rank actions alike:

* ``mean``: the mean of the networks' outputs (IQL / BC / PPO: one network of logits; CQL: the Q
  ensemble, whose mean d3rlpy's greedy action maximises);
* ``bcq``: discrete BCQ (d3rlpy's ``DiscreteBCQ``): networks ``[imitator, q_1, ..., q_k]``; an
  action is *kept* when its imitator log-probability is within ``log(action_flexibility)`` of the
  best one's, and the greedy action is the kept action of highest mean Q (:func:`bcq_scores`).
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
from torch import nn

COMBINES: tuple[str, ...] = ("mean", "bcq")
"""The rules a package's ``combine`` may name."""


def bcq_scores(log_probs: torch.Tensor, q: torch.Tensor, action_flexibility: float) -> torch.Tensor:
    """Discrete BCQ's greedy rule as scores: ``(B, n)`` log-probabilities of the imitator and
    ``(B, n)`` mean Q -> ``(B, n)``.

    Kept actions (``log_probs - max(log_probs) > log(action_flexibility)``, d3rlpy's
    ``DiscreteBCQImpl.inner_predict_best_action``) score their Q; filtered ones score
    ``Q - (max Q - min Q) - 1`` (row-wise), which is below every kept action's Q but keeps their
    order. So the argmax over all actions is d3rlpy's action (the first on ties), and the argmax
    over any set of legal actions is the best kept legal action, or, when no legal action is
    kept, the legal action of highest Q. ``action_flexibility >= 1`` keeps no action (d3rlpy then
    returns action 0; these scores fall back to the highest Q).
    """
    ratio = log_probs - log_probs.max(dim=1, keepdim=True).values
    kept = ratio > math.log(action_flexibility)
    span = q.max(dim=1, keepdim=True).values - q.min(dim=1, keepdim=True).values
    return torch.where(kept, q, q - span - 1.0)


class EnsembleMean(nn.Module):
    """The mean of its members' outputs: d3rlpy's ``reduction="mean"`` over a Q ensemble."""

    def __init__(self, members: Sequence[nn.Module]) -> None:
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)


class BCQScores(nn.Module):
    """obs (B, D) -> :func:`bcq_scores` of ``imitator`` (logits) and the mean of ``q_funcs``."""

    def __init__(
        self, imitator: nn.Module, q_funcs: Sequence[nn.Module], action_flexibility: float
    ) -> None:
        super().__init__()
        if not q_funcs:
            raise ValueError("BCQScores needs at least one Q function")
        self.imitator = imitator
        self.q = EnsembleMean(q_funcs)
        self.action_flexibility = float(action_flexibility)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        log_probs = torch.log_softmax(self.imitator(x), dim=1)
        return bcq_scores(log_probs, self.q(x), self.action_flexibility)


def restrict_mask(mask: torch.Tensor, allowed: torch.Tensor) -> torch.Tensor:
    """``mask`` (B, n) bool AND ``allowed`` (n,) bool, except that a row left with no action keeps
    its own ``mask`` (torch, so that an ONNX graph can hold it; see :func:`restrict_mask_np`)."""
    both = mask & allowed.view(1, -1)
    # Logical ops only: onnxruntime has no boolean Where.
    return both | (mask & ~both.any(dim=1, keepdim=True))


def restrict_mask_np(mask: np.ndarray, allowed: np.ndarray | None) -> np.ndarray:
    """:func:`restrict_mask` in numpy: ``mask`` (B, n) bool AND ``allowed`` (n,) bool (None: all
    actions), a row left with no action keeping its own ``mask``. A new array."""
    mask = np.asarray(mask, dtype=bool)
    if allowed is None:
        return mask.copy()
    both = mask & np.asarray(allowed, dtype=bool)[None, :]
    return np.where(both.any(axis=1, keepdims=True), both, mask)
