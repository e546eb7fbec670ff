"""A gymnasium vector env over the stepwise sampler: one sub-env = one batch element = one episode.

Sub-envs sit at different grid points (the sampler keeps a scheduler per episode); each ``step``
hands all sub-envs' actions to one :meth:`StepwiseSampler.apply` call (jumps and refines are
evaluated in one batched denoiser call there, stops decode and end), plus one ``start`` for the
episodes that begin after a stop. The actions are the sampler's :class:`ActionTable`
(``sampler.table``); the env never dispatches on an action's kind itself.

Autoreset is *same-step*: a sub-env whose episode ends in ``step`` (action stop) is restarted
in the same call with the next prompt/seed; the returned observation is the new episode's first
one, the terminal one is in ``infos["final_obs"]`` (masked by ``infos["_final_obs"]``) and the
finished episode's statistics in ``infos["episode"]`` (masked by ``infos["_episode"]``). That is
the convention SB3 expects, so the SB3 adapter only reshapes infos.

Rewards come from :mod:`addiffusion.rewards.reward` (the one reward definition), with the
dataset's normalisation stats, so online returns are on the scale the offline critic learned: an
action that moves (a jump or refine from point i to j) pays ``step_reward(Q_i, Q_j, NFE_j -
NFE_i)``, stop pays ``stop_reward(Q_i)``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import gymnasium as gym
import numpy as np

from addiffusion.diffusion import mdp
from addiffusion.diffusion.sampler import Episode, StepwiseSampler
from addiffusion.rewards.config import RewardConfig
from addiffusion.rewards.reward import quality, step_reward, stop_reward


class SamplerVectorEnv(gym.vector.VectorEnv):
    """``num_envs`` denoising episodes side by side over one :class:`StepwiseSampler`.

    Observations: ``(num_envs, obs_dim)`` float32 (:func:`StepwiseSampler.observations`).
    Actions: ``(num_envs,)`` ids of the sampler's action table (:attr:`table`, ``Discrete(table.n)``);
    an action the mask forbids raises ``ValueError`` (use :meth:`action_masks`). Rewards:
    ``(num_envs,)`` float32. Episodes always end by stop (the mask allows only stop at the last
    grid point): ``terminations`` is set, ``truncations`` never is.
    """

    metadata: dict[str, Any] = {"autoreset_mode": "same-step"}

    def __init__(
        self,
        sampler: StepwiseSampler,
        prompts: Sequence[str],
        num_envs: int,
        rewards: RewardConfig,
        stats: Mapping[str, Mapping[str, float]] | None,
        seed: int = 0,
    ) -> None:
        if num_envs < 1:
            raise ValueError(f"num_envs must be >= 1, got {num_envs}")
        if not prompts:
            raise ValueError("the env needs at least one prompt, got none")
        missing = sorted(set(rewards.weights) - set(sampler.component_names))
        if missing:
            raise KeyError(
                f"rewards.weights names component {missing[0]!r}, which the sampler does not "
                f"produce (it produces: {', '.join(sampler.component_names)})"
            )
        self.sampler = sampler
        self.table = sampler.table
        self.prompts = list(prompts)
        self.num_envs = num_envs
        self.rewards = rewards
        self.stats = stats
        dim = mdp.ObservationLayout(image_dim=sampler.scorer.dim, text_dim=sampler.scorer.dim).dim
        self.single_observation_space = gym.spaces.Box(-np.inf, np.inf, (dim,), np.float32)
        self.single_action_space = gym.spaces.Discrete(self.table.n)
        self.observation_space = gym.vector.utils.batch_space(
            self.single_observation_space, num_envs
        )
        self.action_space = gym.vector.utils.batch_space(self.single_action_space, num_envs)
        self._seed = seed
        self._rng = np.random.default_rng(seed)
        self._order: list[int] = []
        self.episodes: list[Episode] = []
        self._q = np.zeros(num_envs, np.float64)  # quality Q_i of each sub-env's current x̂0
        self._ret = np.zeros(num_envs, np.float64)
        self._len = np.zeros(num_envs, np.int64)
        self.total_nfe = 0  # denoiser evaluations spent by this env since construction

    # -- tasks: the next (prompt, seed), deterministic given the env's seed
    def _next_tasks(self, n: int) -> tuple[list[str], list[int]]:
        prompts, seeds = [], []
        for _ in range(n):
            if not self._order:  # a fresh permutation each pass over the prompts
                self._order = list(self._rng.permutation(len(self.prompts)))
            prompts.append(self.prompts[self._order.pop()])
            seeds.append(int(self._rng.integers(0, 2**31 - 1)))
        return prompts, seeds

    def _quality(self, episodes: Sequence[Episode]) -> np.ndarray:
        comps = {k: np.array([ep.components[k] for ep in episodes]) for k in self.rewards.weights}
        return quality(comps, self.rewards, self.stats)

    def _start(self, slots: Sequence[int]) -> None:
        prompts, seeds = self._next_tasks(len(slots))
        new, _ = self.sampler.start(prompts, seeds)
        for slot, ep in zip(slots, new, strict=True):
            self.episodes[slot] = ep
        self._q[list(slots)] = self._quality(new)
        self._ret[list(slots)] = 0.0
        self._len[list(slots)] = 0
        self.total_nfe += sum(ep.nfe for ep in new)

    def reset(
        self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start ``num_envs`` new episodes. ``seed`` re-seeds the prompt order and noise seeds."""
        if isinstance(seed, list):
            seed = seed[0]
        if seed is not None:
            self._seed = int(seed)
            self._rng = np.random.default_rng(self._seed)
            self._order = []
        self.episodes = [None] * self.num_envs  # type: ignore[list-item]
        self._start(range(self.num_envs))
        obs = self.sampler.observations(self.episodes)
        if obs.shape[1:] != self.single_observation_space.shape:
            raise RuntimeError(
                f"the sampler's observations have shape {obs.shape[1:]}, but mdp.ObservationLayout "
                f"says {self.single_observation_space.shape}: the two disagree"
            )
        return obs, {}

    def action_masks(self) -> np.ndarray:
        """``(num_envs, table.n)`` bool: the legal actions of each sub-env now."""
        return self.sampler.action_masks(self.episodes)

    def step(
        self, actions: np.ndarray
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray, dict[str, Any]]:
        """Apply one action per sub-env. Returns obs (N, D) float32, rewards (N,) float32,
        terminations (N,) bool, truncations (N,) bool, infos (gymnasium's dict-of-arrays)."""
        if not self.episodes:
            raise RuntimeError("call reset() before step()")
        n = self.num_envs
        actions = np.asarray(actions).reshape(-1).astype(np.int64)
        if actions.shape != (n,):
            raise ValueError(f"expected {n} actions (one per sub-env), got shape {actions.shape}")
        masks = self.action_masks()
        t = self.table
        for i, a in enumerate(actions):
            if not (0 <= a < t.n and masks[i, a]):
                legal = [t.names[k] for k in np.flatnonzero(masks[i])]
                name = t.names[a] if 0 <= a < t.n else f"id {a}"
                raise ValueError(
                    f"sub-env {i} (grid point {self.episodes[i].step}): action {name} is not "
                    f"allowed by the action mask; legal: {', '.join(legal)}"
                )
        rewards = np.zeros(n, np.float32)
        nfe_before = np.array([ep.nfe for ep in self.episodes])

        # 1. one call for all sub-envs: jumps / refines move (one batched evaluation), stops end
        applied = self.sampler.apply(self.episodes, actions)
        moved = np.array(applied.moved, np.int64)
        stopped = np.array(applied.stopped, np.int64)
        if moved.size:
            eps = [self.episodes[i] for i in moved]
            q_next = self._quality(eps)
            delta_nfe = np.array([ep.nfe for ep in eps]) - nfe_before[moved]
            self.total_nfe += int(delta_nfe.sum())
            rewards[moved] = step_reward(self._q[moved], q_next, delta_nfe, self.rewards)
            self._q[moved] = q_next

        # 2. stop: terminal bonus on the decoded x̂0, then same-step autoreset
        done = np.zeros(n, bool)
        done[stopped] = True
        rewards[stopped] = stop_reward(self._q[stopped], self.rewards)
        self._ret += rewards
        self._len += 1
        infos: dict[str, Any] = {}
        if stopped.size:
            eps = [self.episodes[i] for i in stopped]
            final_obs = np.zeros((n, *self.single_observation_space.shape), np.float32)
            final_obs[stopped] = self.sampler.observations(eps)
            infos["final_obs"], infos["_final_obs"] = final_obs, done.copy()
            infos["episode"] = {
                "r": np.where(done, self._ret, 0.0).astype(np.float32),
                "l": np.where(done, self._len, 0).astype(np.int64),
                "nfe": np.where(done, [ep.nfe for ep in self.episodes], 0).astype(np.int64),
            }
            infos["_episode"] = done.copy()
            self._start(list(stopped))
        obs = self.sampler.observations(self.episodes)
        return obs, rewards, done, np.zeros(n, bool), infos

    def close_extras(self, **kwargs: Any) -> None:
        self.episodes = []
