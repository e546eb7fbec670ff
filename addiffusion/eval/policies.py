"""What evaluation runs: anything with ``act(obs, mask) -> actions``, plus the heuristic baselines.

Learned policies (``addiffusion.offline_rl.load_policy``, ``addiffusion.online_finetune.
load_finetuned_policy``) satisfy :class:`Policy` and are loaded by the CLI only; the heuristics
here read the quality block of the observation (the last ``len(mdp.QUALITY_FIELDS)`` entries,
see :mod:`addiffusion.diffusion.mdp`), so they see exactly what a learned policy sees.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Protocol, runtime_checkable

import numpy as np
import torch

from addiffusion.diffusion import mdp
from addiffusion.diffusion.actions import ActionTable

if TYPE_CHECKING:
    from addiffusion.diffusion.sampler import Episode

_Q = {name: i - len(mdp.QUALITY_FIELDS) for i, name in enumerate(mdp.QUALITY_FIELDS)}
"""Negative index of each quality field in the observation vector."""


@runtime_checkable
class Policy(Protocol):
    """A policy over the action table of the sampler it runs on.

    ``act(obs: (B, D) float32 | None, mask: (B, table.n) bool) -> (B,) int`` action ids
    (``obs`` is None on a sampler built with ``observe=False``). Actions outside ``mask`` are
    replaced by evaluation (jump-1 if legal, else stop) and counted as ``masked_actions``.
    """

    def act(self, obs: np.ndarray | None, mask: np.ndarray) -> np.ndarray: ...


@runtime_checkable
class EpisodicPolicy(Protocol):
    """A policy with memory per episode. The rollout calls ``begin(n)`` before each batch of
    ``n`` episodes and ``act_episodes(ids, obs, mask, episodes)`` instead of ``act``: ``ids``
    (B,) are the positions in the batch of the rows of ``obs`` / ``mask`` (episodes that stopped
    drop out) and ``episodes`` the sampler's live episodes of those rows (training-free rules
    read their latents)."""

    def begin(self, n: int) -> None: ...

    def act_episodes(
        self,
        ids: np.ndarray,
        obs: np.ndarray | None,
        mask: np.ndarray,
        episodes: Sequence[Episode],
    ) -> np.ndarray: ...


def quality_field(obs: np.ndarray, name: str) -> np.ndarray:
    """One quality field of each observation: ``(B, D) -> (B,)``."""
    return np.asarray(obs)[:, _Q[name]]


def _stop_where(cond: np.ndarray, mask: np.ndarray, table: ActionTable) -> np.ndarray:
    stop = np.asarray(cond, bool) & mask[:, table.stop]
    one = table.jump(1)
    # The last point allows only stop: a heuristic that never fires stops there.
    stop |= ~mask[:, one]
    return np.where(stop, table.stop, one).astype(np.int64)


@dataclass(frozen=True)
class FixedSchedule:
    """Every point of the sampler's grid, then stop: the fixed k-step baseline on a k-point grid."""

    table: ActionTable

    def act(self, obs: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
        return _stop_where(np.zeros(len(mask), bool), mask, self.table)


@dataclass(frozen=True)
class RandomStride:
    """A uniformly random jump at every point (seeded), stop at the last point: the schedule
    chosen blindly, the learned policies' no-information reference."""

    table: ActionTable
    seed: int = 0

    def act(self, obs: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
        rng = np.random.default_rng([self.seed, int(mask.sum())])
        jumps = np.array(self.table.jumps)
        pick = jumps[rng.integers(0, len(jumps), len(mask))]
        return np.where(mask[:, self.table.jump(1)], pick, self.table.stop).astype(np.int64)


@dataclass(frozen=True)
class StabilityStop:
    """Stop once x̂0 has settled: cosine(features_i, features_{i-1}) >= ``threshold``."""

    threshold: float
    table: ActionTable

    def act(self, obs: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
        return _stop_where(quality_field(obs, "stability") >= self.threshold, mask, self.table)


@dataclass(frozen=True)
class ClipDeltaStop:
    """Stop once one more step buys little: CLIP score_i - score_{i-1} < ``threshold``."""

    threshold: float
    table: ActionTable

    def act(self, obs: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
        return _stop_where(
            quality_field(obs, "clip_score_delta") < self.threshold, mask, self.table
        )


@dataclass
class PatienceStop:
    """Quality-guided early stop with patience: stop once the CLIP score of x̂0 has not beaten
    its best so far by more than ``min_gain`` for ``patience`` consecutive points."""

    min_gain: float
    patience: int
    table: ActionTable
    _best: np.ndarray = field(default_factory=lambda: np.zeros(0), repr=False)
    _stale: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)

    def begin(self, n: int) -> None:
        self._best = np.full(n, -np.inf)
        self._stale = np.zeros(n, np.int64)

    def act_episodes(
        self,
        ids: np.ndarray,
        obs: np.ndarray | None,
        mask: np.ndarray,
        episodes: Sequence[Episode],
    ) -> np.ndarray:
        score = quality_field(obs, "clip_score")
        better = score > self._best[ids] + self.min_gain
        self._stale[ids] = np.where(better, 0, self._stale[ids] + 1)
        self._best[ids] = np.maximum(self._best[ids], score)
        return _stop_where(self._stale[ids] >= self.patience, mask, self.table)


@dataclass
class AdaptiveDiffusionSkip:
    """AdaptiveDiffusion's training-free rule (Ye et al., NeurIPS 2024) on the sampler's
    ``reuse`` action: skip the denoiser (reuse its last output) while the latent trajectory is
    locally linear, i.e. its third-order difference is small.

    With ``d_j = mean |x_j - x_{j-1}|`` over the latents visited so far, point i reuses when
    ``|(d_i + d_{i-2}) / 2 - d_{i-1}| <= threshold * d_{i-1}`` (``2 *`` that is the second
    difference of d, a third-order difference of x) and fewer than ``max_skips`` reuses are in
    a row; else jump-1; stop at the last point. Needs the table's reuse action. One
    difference from the reference implementation: there the test runs on the latent the
    solver step just produced, here at the decision point before it (a one-point lag), because
    the MDP decides before stepping.
    """

    threshold: float
    max_skips: int
    table: ActionTable
    _d: list[list[float]] = field(default_factory=list, repr=False)
    _last: list[torch.Tensor | None] = field(default_factory=list, repr=False)
    _skips: np.ndarray = field(default_factory=lambda: np.zeros(0, np.int64), repr=False)

    def begin(self, n: int) -> None:
        self._d = [[] for _ in range(n)]
        self._last = [None] * n
        self._skips = np.zeros(n, np.int64)

    def act_episodes(
        self,
        ids: np.ndarray,
        obs: np.ndarray | None,
        mask: np.ndarray,
        episodes: Sequence[Episode],
    ) -> np.ndarray:
        t = self.table
        out = np.empty(len(ids), np.int64)
        for row, (i, ep) in enumerate(zip(ids.tolist(), episodes, strict=True)):
            x = ep.latents.detach().float().cpu()
            if self._last[i] is not None:
                self._d[i].append(float((x - self._last[i]).abs().mean()))
            self._last[i] = x
            d = self._d[i]
            linear = len(d) >= 3 and abs((d[-1] + d[-3]) / 2 - d[-2]) <= self.threshold * d[-2]
            if not mask[row, t.jump(1)]:
                out[row] = t.stop
            elif linear and self._skips[i] < self.max_skips and mask[row, t.reuse]:
                out[row] = t.reuse
            else:
                out[row] = t.jump(1)
            self._skips[i] = self._skips[i] + 1 if out[row] == t.reuse else 0
        return out


@dataclass(frozen=True)
class ProgressStride:
    """A progress-based adaptive schedule, like an adaptive step-size controller: the change of
    x̂0 per point is ``1 - stability`` (cosine of consecutive x̂0 features); take the longest
    jump whose predicted change ``stride * (1 - stability)`` stays within ``tolerance``
    (jump-1 at least), and stop at the last point. Small changes -> long jumps."""

    tolerance: float
    table: ActionTable

    def act(self, obs: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
        change = np.maximum(1.0 - quality_field(obs, "stability"), 1e-9)
        strides = np.array(self.table.strides)
        jumps = np.array(self.table.jumps)
        fits = strides[None, :] * change[:, None] <= self.tolerance
        fits[:, strides == 1] = True
        pick = jumps[np.where(fits, strides[None, :], 0).argmax(axis=1)]
        return np.where(mask[:, self.table.jump(1)], pick, self.table.stop).astype(np.int64)


@dataclass(frozen=True)
class StopAtStep:
    """jump-1 until grid point ``step`` (0-based), then stop: after ``step + 1`` NFE without
    refines. The point is read from the observation's ``nfe / n_max`` field, so ``table.n_max``
    must be the grid the policy runs on. A fixed-budget reference on the adaptive grid."""

    step: int
    table: ActionTable

    def act(self, obs: np.ndarray | None, mask: np.ndarray) -> np.ndarray:
        nfe = np.rint(quality_field(obs, "nfe_frac") * self.table.n_max).astype(np.int64)
        return _stop_where(nfe - 1 >= self.step, mask, self.table)
