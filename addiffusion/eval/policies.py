"""What evaluation runs: anything with ``act(obs, mask) -> actions``, plus the heuristic baselines.

Learned policies (``addiffusion.offline_rl.load_policy``, ``addiffusion.online_finetune.
load_finetuned_policy``) satisfy :class:`Policy` and are loaded by the CLI only; the heuristics
here read the quality block of the observation (the last ``len(mdp.QUALITY_FIELDS)`` entries,
see :mod:`addiffusion.diffusion.mdp`), so they see exactly what a learned policy sees.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import numpy as np

from addiffusion.diffusion import mdp

_Q = {name: i - len(mdp.QUALITY_FIELDS) for i, name in enumerate(mdp.QUALITY_FIELDS)}
"""Negative index of each quality field in the observation vector."""


@runtime_checkable
class Policy(Protocol):
    """A stop / continue / refine policy.

    ``act(obs: (B, D) float32, mask: (B, 3) bool) -> (B,) int`` in {0 continue, 1 stop, 2 refine}.
    Actions outside ``mask`` are replaced by evaluation (continue if legal, else stop) and counted
    as ``masked_actions`` in the metrics.
    """

    def act(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray: ...


def quality_field(obs: np.ndarray, name: str) -> np.ndarray:
    """One quality field of each observation: ``(B, D) -> (B,)``."""
    return np.asarray(obs)[:, _Q[name]]


def _stop_where(cond: np.ndarray, mask: np.ndarray) -> np.ndarray:
    stop = np.asarray(cond, bool) & mask[:, mdp.STOP]
    # The last step allows only stop: a heuristic that never fires stops there.
    stop |= ~mask[:, mdp.CONTINUE]
    return np.where(stop, mdp.STOP, mdp.CONTINUE).astype(np.int64)


@dataclass(frozen=True)
class StabilityStop:
    """Stop once x̂0 has settled: cosine(features_i, features_{i-1}) >= ``threshold``."""

    threshold: float

    def act(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return _stop_where(quality_field(obs, "stability") >= self.threshold, mask)


@dataclass(frozen=True)
class ClipDeltaStop:
    """Stop once one more step buys little: CLIP score_i - score_{i-1} < ``threshold``."""

    threshold: float

    def act(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return _stop_where(quality_field(obs, "clip_score_delta") < self.threshold, mask)


@dataclass(frozen=True)
class StopAtStep:
    """Stop at schedule step ``step`` (0-based), i.e. after ``step + 1`` NFE without refines.

    The step is read from the observation's ``nfe / n_max`` field, so ``n_max`` must be the
    schedule the policy runs on. A fixed-budget reference on the adaptive schedule.
    """

    step: int
    n_max: int

    def act(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        nfe = np.rint(quality_field(obs, "nfe_frac") * self.n_max).astype(np.int64)
        return _stop_where(nfe - 1 >= self.step, mask)
