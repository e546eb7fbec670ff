"""Exact off-policy evaluation of *when to stop*, among the points on each recorded path.

A trajectory (a root, or a branch with its entry transition) follows a recorded path of actions
(jumps / refine) and stops at its last point; the converter adds, for every point where stop is
legal, a one-step terminal episode ``(s_i, stop, r_stop_i)``. So the return of "follow the path
until its j-th point, then stop" is known for every j without a model:

    R(j) = Σ_{i<j} r_i + r_stop_j          (undiscounted: the quality/NFE trade-off itself)

with ``r_i`` the reward of the recorded action at point i. A policy is rolled along each path
with two legal choices per point: the path's recorded action (its outcome is in the data) and
stop (where a stop outcome was recorded); at the last point only stop. It stops at the first
point it picks stop. We report its mean R, the oracle's (best j in hindsight) and the regret.
Stop outcomes are matched to path points by identical observation vectors. Action ids come from
the dataset's action table.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np
from d3rlpy.dataset import EpisodeBase

from addiffusion.diffusion.actions import ActionTable

ActFn = Callable[[np.ndarray, np.ndarray], np.ndarray]
"""``act(obs (N, D) float32, mask (N, table.n) bool) -> (N,) int``."""


@dataclass(frozen=True)
class StopEvaluation:
    n_episodes: int
    """Trajectories evaluated (episodes of >= 2 points ending in a recorded stop)."""
    mean_return: float
    """Mean undiscounted return R(j) at the policy's stop step."""
    oracle_return: float
    """Mean of max_j R(j)."""
    regret: float
    """oracle_return - mean_return (>= 0)."""
    mean_stop_step: float
    """Mean index (along its path, 0 = first point) of the point where the policy stops."""
    oracle_stop_step: float
    """Mean index of the earliest best stop point."""
    best_stop_rate: float
    """Fraction of episodes where the policy's stop step attains max_j R(j)."""

    def to_dict(self) -> dict[str, float | int]:
        return asdict(self)


@dataclass(frozen=True)
class _Trajectory:
    observations: np.ndarray  # (T, D) float32
    actions: np.ndarray  # (T - 1,) recorded action at point i (the path)
    path_rewards: np.ndarray  # (T - 1,) its reward
    stop_rewards: np.ndarray  # (T,) reward of stopping at step i, nan where unknown


def stop_trajectories(episodes: Sequence[EpisodeBase], table: ActionTable) -> list[_Trajectory]:
    """Trajectories with the stop outcome of each point attached (see module docstring)."""
    stop = table.stop
    stop_at: dict[bytes, float] = {}
    for ep in episodes:
        if ep.size() == 1 and ep.terminated and int(np.asarray(ep.actions).reshape(-1)[0]) == stop:
            obs = np.ascontiguousarray(ep.observations[0], dtype=np.float32)
            stop_at[obs.tobytes()] = float(np.asarray(ep.rewards).reshape(-1)[0])
    out = []
    for ep in episodes:
        actions = np.asarray(ep.actions).reshape(-1).astype(np.int64)
        if (
            ep.size() < 2
            or not ep.terminated
            or actions[-1] != stop
            or np.any(actions[:-1] == stop)
        ):
            continue
        obs = np.ascontiguousarray(ep.observations, dtype=np.float32)
        rewards = np.asarray(ep.rewards, dtype=np.float64).reshape(-1)
        known = [stop_at.get(o.tobytes(), np.nan) for o in obs[:-1]]
        out.append(_Trajectory(obs, actions[:-1], rewards[:-1], np.array([*known, rewards[-1]])))
    return out


def evaluate_stops(
    act: ActFn, episodes: Sequence[EpisodeBase], table: ActionTable
) -> StopEvaluation | None:
    """Roll ``act`` along every recorded path in ``episodes``; None if there is none."""
    trajs = stop_trajectories(episodes, table)
    if not trajs:
        return None
    obs = np.concatenate([t.observations for t in trajs])
    masks = []
    for t in trajs:
        m = np.zeros((len(t.observations), table.n), dtype=bool)
        m[np.arange(len(t.actions)), t.actions] = True
        m[:, table.stop] = ~np.isnan(t.stop_rewards)
        masks.append(m)
    actions = np.asarray(act(obs, np.concatenate(masks))).reshape(-1)

    got, best, steps, best_steps, hits = [], [], [], [], []
    start = 0
    for t in trajs:
        n = len(t.observations)
        a = actions[start : start + n]
        start += n
        # R(j) for every j; nan where stopping was not possible.
        returns = np.concatenate([[0.0], np.cumsum(t.path_rewards)]) + t.stop_rewards
        stops = np.flatnonzero(a == table.stop)
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
