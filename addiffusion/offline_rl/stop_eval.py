"""Exact off-policy evaluation of *when to stop*, from the counterfactual stop transitions.

A root trajectory runs to ``n_max`` and the converter adds, for every step where stop is legal, a
one-step terminal episode ``(s_i, STOP, r_stop_i)``. So the return of "continue until j, then
stop" is known for every j without a model:

    R(j) = Σ_{i<j} r_cont_i + r_stop_j          (undiscounted: the quality/NFE trade-off itself)

A policy is rolled along each recorded trajectory with refine masked off (its outcome is not in the
trajectory), stop masked off where no stop outcome was recorded (warm-up) and continue masked off at
the last step; it stops at the first step it picks STOP. We report its mean R, the oracle's
(best j in hindsight) and the regret. Stop outcomes are matched to trajectory steps by identical
observation vectors.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from d3rlpy.dataset import EpisodeBase

from addiffusion.diffusion.mdp import CONTINUE, N_ACTIONS, REFINE, STOP

ActFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``act(obs (N, D) float32, mask (N, 3) bool) -> (N,) int``."""


@dataclass(frozen=True)
class StopEvaluation:
    n_episodes: int
    """Root trajectories evaluated (all-continue episodes of >= 2 steps ending in a known stop)."""
    mean_return: float
    """Mean undiscounted return R(j) at the policy's stop step."""
    oracle_return: float
    """Mean of max_j R(j)."""
    regret: float
    """oracle_return - mean_return (>= 0)."""
    mean_stop_step: float
    oracle_stop_step: float
    """Mean of the earliest best stop step."""
    best_stop_rate: float
    """Fraction of episodes where the policy's stop step attains max_j R(j)."""

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class _Trajectory:
    observations: np.ndarray  # (T, D) float32
    continue_rewards: np.ndarray  # (T - 1,) reward of continuing from step i
    stop_rewards: np.ndarray  # (T,) reward of stopping at step i, nan where unknown


def stop_trajectories(episodes: Sequence[EpisodeBase]) -> list[_Trajectory]:
    """Root trajectories with the stop outcome of each step attached (see module docstring)."""
    stop_at: dict[bytes, float] = {}
    for ep in episodes:
        if ep.size() == 1 and ep.terminated and int(np.asarray(ep.actions).reshape(-1)[0]) == STOP:
            obs = np.ascontiguousarray(ep.observations[0], dtype=np.float32)
            stop_at[obs.tobytes()] = float(np.asarray(ep.rewards).reshape(-1)[0])
    out = []
    for ep in episodes:
        actions = np.asarray(ep.actions).reshape(-1).astype(np.int64)
        if ep.size() < 2 or not ep.terminated or actions[-1] != STOP:
            continue
        if np.any(actions[:-1] != CONTINUE):
            continue  # a refine branch: its continuation is not the all-continue path
        obs = np.ascontiguousarray(ep.observations, dtype=np.float32)
        rewards = np.asarray(ep.rewards, dtype=np.float64).reshape(-1)
        stop = np.array([stop_at.get(o.tobytes(), np.nan) for o in obs[:-1]] + [rewards[-1]])
        out.append(_Trajectory(obs, rewards[:-1], stop))
    return out


def evaluate_stops(act: ActFn, episodes: Sequence[EpisodeBase]) -> StopEvaluation | None:
    """Roll ``act`` along every root trajectory in ``episodes``; None if there is none."""
    trajs = stop_trajectories(episodes)
    if not trajs:
        return None
    obs = np.concatenate([t.observations for t in trajs])
    masks = []
    for t in trajs:
        m = np.zeros((len(t.observations), N_ACTIONS), dtype=bool)
        m[:-1, CONTINUE] = True
        m[:, STOP] = ~np.isnan(t.stop_rewards)
        m[:, REFINE] = False
        masks.append(m)
    actions = np.asarray(act(obs, np.concatenate(masks))).reshape(-1)

    got, best, steps, best_steps, hits = [], [], [], [], []
    start = 0
    for t in trajs:
        n = len(t.observations)
        a = actions[start : start + n]
        start += n
        # R(j) for every j; nan where stopping was not possible.
        returns = np.concatenate([[0.0], np.cumsum(t.continue_rewards)]) + t.stop_rewards
        stops = np.flatnonzero(a == STOP)
        j = int(stops[0]) if stops.size else n - 1
        best_value = float(np.nanmax(returns))
        got.append(float(returns[j]))
        best.append(best_value)
        steps.append(j)
        best_steps.append(int(np.nanargmax(returns)))
        hits.append(bool(np.isclose(returns[j], best_value, rtol=0.0, atol=1e-6)))
    return StopEvaluation(
        n_episodes=len(trajs),
        mean_return=float(np.mean(got)),
        oracle_return=float(np.mean(best)),
        regret=float(np.mean(best) - np.mean(got)),
        mean_stop_step=float(np.mean(steps)),
        oracle_stop_step=float(np.mean(best_steps)),
        best_stop_rate=float(np.mean(hits)),
    )
