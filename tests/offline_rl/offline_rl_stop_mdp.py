"""A small synthetic stop-MDP shaped like the real converted data, with a known best stop step.

Each episode has ``N_STEPS`` denoising steps and one of two prompt categories. The quality of
x̂0 rises by ``RISE`` per step until the category's best step ``k`` and is flat after it; every
continue costs ``C_NFE``. With the real reward (continue: ΔQ - c_nfe, stop: bonus·Q) stopping at
``j`` returns ``2·Q_j - c_nfe·j + const``: best stop at ``k``. Like the real converter, a root
trajectory continues to the last step and stops there; every step after warm-up also gets a
one-step terminal counterfactual stop episode.
"""

from __future__ import annotations

import numpy as np
from d3rlpy.constants import ActionSpace
from d3rlpy.dataset import MDPDataset, ReplayBuffer

from addiffusion.diffusion.actions import ActionTable

N_STEPS = 8
WARMUP = 1
BEST_STOP = {0: 3, 1: 5}  # category -> best stop step
RISE, C_NFE, BONUS = 0.5, 0.3, 1.0
OBS_DIM = 12
TABLE = ActionTable.build([1], N_STEPS, WARMUP, refine_budget=0, refine_k=2)
"""jump-1 (the old continue) = 0, stop = 1, refine = 2."""


def episode_observations(category: int, rng: np.random.Generator, noise: float) -> np.ndarray:
    """(N_STEPS, OBS_DIM) float32 observations and the quality per step."""
    steps = np.arange(N_STEPS)
    quality = RISE * np.minimum(steps, BEST_STOP[category]) + noise * rng.normal()
    delta = np.concatenate([[0.0], np.diff(quality)])
    onehot = np.zeros((N_STEPS, 2))
    onehot[:, category] = 1.0
    frac = steps / (N_STEPS - 1)
    obs = np.column_stack(
        [
            frac,
            np.sin(np.pi * frac),
            np.cos(np.pi * frac),
            onehot,
            quality,
            delta,
            (steps + 1) / N_STEPS,
            noise * rng.normal(size=(N_STEPS, 4)),
        ]
    )
    return obs.astype(np.float32), quality


def stop_mask(step: np.ndarray) -> np.ndarray:
    """Legal actions per step: warm-up forces continue, the last step forces stop, no refine."""
    step = np.asarray(step)
    return TABLE.mask(np.asarray(step))


def make_buffer(n_episodes: int, seed: int, noise: float = 0.05) -> ReplayBuffer:
    rng = np.random.default_rng(seed)
    obs_rows, actions, rewards, terminals = [], [], [], []
    for e in range(n_episodes):
        category = e % 2
        obs, quality = episode_observations(category, rng, noise)
        # root trajectory: continue to the end, stop at the last step
        obs_rows.append(obs)
        actions += [0] * (N_STEPS - 1) + [1]
        rewards += list(np.diff(quality) - C_NFE) + [BONUS * quality[-1]]
        terminals += [0.0] * (N_STEPS - 1) + [1.0]
        # counterfactual stops: one-step terminal episodes
        for i in range(WARMUP, N_STEPS - 1):
            obs_rows.append(obs[i : i + 1])
            actions.append(1)
            rewards.append(BONUS * quality[i])
            terminals.append(1.0)
    return MDPDataset(
        observations=np.concatenate(obs_rows),
        actions=np.asarray(actions, dtype=np.int64),
        rewards=np.asarray(rewards, dtype=np.float32).reshape(-1, 1),
        terminals=np.asarray(terminals, dtype=np.float32),
        action_space=ActionSpace.DISCRETE,
        action_size=TABLE.n,
    )
