"""A gymnasium vector env over the stepwise sampler: one sub-env = one batch element = one episode.

Sub-envs sit at different grid points (the sampler keeps a scheduler per episode); each ``step``
hands all sub-envs' actions to one :meth:`StepwiseSampler.apply` call (jumps and refines are
evaluated in one batched denoiser call there, stops decode and end), plus one ``start`` for the
episodes that begin after a stop. The actions are the sampler's :class:`ActionTable`
(``sampler.table``); the env never dispatches on an action's kind itself.

Autoreset is *next-step* (gymnasium 1.0's convention, which its vector wrappers such as
``RecordEpisodeStatistics`` assume): a sub-env whose episode ends in ``step`` (action stop) returns
the terminal observation with ``terminations[i]`` set; the next ``step`` ignores its action, starts
its next episode (reward 0, no termination) and returns the new episode's first observation.
``reset(options={"reset_mask": mask})`` starts the masked sub-envs' next episodes at once (the SB3
adapter does so to get SB3's same-step autoreset). The finished episode's own statistics are in
``infos["final_episode"]`` (``r`` return, ``l`` length, ``nfe``, and the reward-hacking watch's
``clip_score_delta`` and ``verifier_delta``: the final image's raw ``clip_score`` / ``verifier``
minus those of the episode's first decision point, its first x̂0; ``verifier_delta`` is NaN when
the sampler has no ``verifier`` component, as only the shapes world has; masked by
``infos["_final_episode"]``), a key no gymnasium wrapper writes.

Ablations (:mod:`addiffusion.online_finetune.ablation`): ``allowed`` ANDs every mask with a
subset of the actions (``restrict_mask_np``, as the offline policy does), and
``observation_drop`` zeroes parts of every observation returned
(:func:`addiffusion.diffusion.mdp.drop_parts`), so a policy restricted offline stays restricted.

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
from addiffusion.policy.combine import restrict_mask_np
from addiffusion.rewards.config import RewardConfig
from addiffusion.rewards.reward import quality, step_reward, stop_reward

# gymnasium >= 1.1 reads metadata["autoreset_mode"] as a gym.vector.AutoresetMode; 1.0 (pinned)
# has no such enum and its vector wrappers assume next-step: the enum's value says the same.
NEXT_STEP: Any = getattr(getattr(gym.vector, "AutoresetMode", None), "NEXT_STEP", "NextStep")
RESET_OPTIONS = ("reset_mask", "prompts", "seeds")
"""Keys ``SamplerVectorEnv.reset`` reads from ``options``."""


WATCHED = ("clip_score", "verifier")
"""Raw components of the reward-hacking watch (``final_episode``'s ``*_delta``)."""


def observation_layout(sampler: StepwiseSampler) -> mdp.ObservationLayout:
    """Where the parts of ``sampler``'s observation vector live."""
    return mdp.ObservationLayout(image_dim=sampler.scorer.dim, text_dim=sampler.scorer.dim)


def observation_dim(sampler: StepwiseSampler) -> int:
    """Length of the MDP observation vector of ``sampler`` (:class:`mdp.ObservationLayout`)."""
    return observation_layout(sampler).dim


class SamplerVectorEnv(gym.vector.VectorEnv):
    """``num_envs`` denoising episodes side by side over one :class:`StepwiseSampler`.

    Observations: ``(num_envs, obs_dim)`` float32 (:func:`StepwiseSampler.observations`).
    Actions: ``(num_envs,)`` ids of the sampler's action table (:attr:`table`, ``Discrete(table.n)``);
    an action the mask forbids raises ``ValueError`` (use :meth:`action_masks`). Rewards:
    ``(num_envs,)`` float32. Episodes always end by stop (the mask allows only stop at the last
    grid point): ``terminations`` is set, ``truncations`` never is. Autoreset: next-step (see the
    module docstring). ``allowed`` ``(table.n,)`` bool and ``observation_drop`` (observation
    parts) restrict the masks and zero parts of the observations (module docstring).
    """

    metadata: dict[str, Any] = {"autoreset_mode": NEXT_STEP}

    def __init__(
        self,
        sampler: StepwiseSampler,
        prompts: Sequence[str],
        num_envs: int,
        rewards: RewardConfig,
        stats: Mapping[str, Mapping[str, float]] | None,
        seed: int = 0,
        allowed: np.ndarray | None = None,
        observation_drop: Sequence[str] = (),
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
        self.layout = observation_layout(sampler)
        self.observation_drop = tuple(observation_drop)
        self.layout.keep_mask(self.observation_drop)  # raises on an unknown part
        self.allowed = None if allowed is None else np.asarray(allowed, dtype=bool).copy()
        if self.allowed is not None and self.allowed.shape != (self.table.n,):
            raise ValueError(
                f"allowed must be a ({self.table.n},) bool array (one per action of "
                f"{list(self.table.names)}), got shape {self.allowed.shape}"
            )
        dim = self.layout.dim
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
        self._autoreset = np.zeros(num_envs, bool)  # ended last step: restarts in the next one
        # raw components of each sub-env's first decision point, for the reward-hacking watch
        self._first = np.full((num_envs, len(WATCHED)), np.nan)
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

    def _start(
        self, slots: Sequence[int], tasks: tuple[Sequence[str], Sequence[int]] | None = None
    ) -> None:
        prompts, seeds = self._next_tasks(len(slots)) if tasks is None else tasks
        new, _ = self.sampler.start(prompts, seeds)
        for slot, ep in zip(slots, new, strict=True):
            self.episodes[slot] = ep
        self._q[list(slots)] = self._quality(new)
        self._ret[list(slots)] = 0.0
        self._len[list(slots)] = 0
        self._autoreset[list(slots)] = False
        self._first[list(slots)] = self._watched(new)
        self.total_nfe += sum(ep.nfe for ep in new)

    @staticmethod
    def _watched(episodes: Sequence[Episode]) -> np.ndarray:
        """``(B, len(WATCHED))`` raw components (NaN for one the sampler does not produce)."""
        return np.array([[ep.components.get(k, np.nan) for k in WATCHED] for ep in episodes])

    def _observe(self) -> np.ndarray:
        """The sub-envs' observations, with the dropped parts zeroed."""
        obs = self.sampler.observations(self.episodes)
        return mdp.drop_parts(obs, self.layout, self.observation_drop)

    def _reset_slots(self, options: Mapping[str, Any]) -> list[int]:
        """The sub-envs ``reset`` restarts: all, or those of ``options["reset_mask"]``."""
        if "reset_mask" not in options:
            return list(range(self.num_envs))
        mask = np.asarray(options["reset_mask"])
        if mask.shape != (self.num_envs,) or mask.dtype != bool:
            raise ValueError(
                f"options['reset_mask'] must be a ({self.num_envs},) bool array, got shape "
                f"{mask.shape} dtype {mask.dtype}"
            )
        if not self.episodes:
            raise RuntimeError("reset() without a reset_mask must come first")
        return [int(i) for i in np.flatnonzero(mask)]

    def _given_tasks(
        self, options: Mapping[str, Any], n: int
    ) -> tuple[Sequence[str], Sequence[int]] | None:
        """``options["prompts"]`` and ``options["seeds"]`` (both or neither), one per reset sub-env."""
        if "prompts" not in options and "seeds" not in options:
            return None
        if "prompts" not in options or "seeds" not in options:
            raise ValueError("reset options 'prompts' and 'seeds' go together; got only one")
        prompts, seeds = list(options["prompts"]), [int(s) for s in options["seeds"]]
        if len(prompts) != n or len(seeds) != n:
            raise ValueError(
                f"reset restarts {n} sub-env(s) but got {len(prompts)} prompts and "
                f"{len(seeds)} seeds"
            )
        return prompts, seeds

    def reset(
        self, *, seed: int | list[int] | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        """Start new episodes; returns every sub-env's observation ``(num_envs, obs_dim)``.

        ``seed`` re-seeds the prompt order and noise seeds. ``options``: ``reset_mask``
        ``(num_envs,)`` bool restarts only those sub-envs (gymnasium's partial reset; the others
        keep their episodes); ``prompts`` and ``seeds`` give the restarted sub-envs' (prompt, noise
        seed) instead of drawing them.
        """
        options = dict(options or {})
        unknown = sorted(set(options) - set(RESET_OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown reset option {unknown[0]!r}; expected some of {', '.join(RESET_OPTIONS)}"
            )
        slots = self._reset_slots(options)
        tasks = self._given_tasks(options, len(slots))
        if isinstance(seed, list):
            seed = seed[0]
        if seed is not None:
            self._seed = int(seed)
            self._rng = np.random.default_rng(self._seed)
            self._order = []
        if "reset_mask" not in options:
            self.episodes = [None] * self.num_envs  # type: ignore[list-item]
        if slots:
            self._start(slots, tasks)
        obs = self._observe()
        if obs.shape[1:] != self.single_observation_space.shape:
            raise RuntimeError(
                f"the sampler's observations have shape {obs.shape[1:]}, but mdp.ObservationLayout "
                f"says {self.single_observation_space.shape}: the two disagree"
            )
        return obs, {}

    def action_masks(self) -> np.ndarray:
        """``(num_envs, table.n)`` bool: the legal actions of each sub-env now, ANDed with
        ``allowed`` (a row left with none keeps its legal actions, the offline policy's rule). A
        sub-env whose episode ended in the last step allows every action (the next step ignores
        it)."""
        masks = restrict_mask_np(self.sampler.action_masks(self.episodes), self.allowed)
        masks[self._autoreset] = True
        return masks

    def _check_actions(self, actions: np.ndarray, live: np.ndarray) -> None:
        masks = self.action_masks()
        t = self.table
        for i in live:
            a = actions[i]
            if not (0 <= a < t.n and masks[i, a]):
                legal = [t.names[k] for k in np.flatnonzero(masks[i])]
                name = t.names[a] if 0 <= a < t.n else f"id {a}"
                raise ValueError(
                    f"sub-env {i} (grid point {self.episodes[i].step}): action {name} is not "
                    f"allowed by the action mask; legal: {', '.join(legal)}"
                )

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
        restart = self._autoreset.copy()  # ended last step: their actions are ignored
        live = np.flatnonzero(~restart)
        self._check_actions(actions, live)
        rewards = np.zeros(n, np.float32)
        done = np.zeros(n, bool)
        nfe_before = np.array([ep.nfe for ep in self.episodes])

        # 1. one call for all live sub-envs: jumps / refines move (one batched evaluation), stops end
        if live.size:
            applied = self.sampler.apply([self.episodes[i] for i in live], actions[live])
            moved = live[np.array(applied.moved, np.int64)]
            stopped = live[np.array(applied.stopped, np.int64)]
            if moved.size:
                eps = [self.episodes[i] for i in moved]
                q_next = self._quality(eps)
                delta_nfe = np.array([ep.nfe for ep in eps]) - nfe_before[moved]
                self.total_nfe += int(delta_nfe.sum())
                rewards[moved] = step_reward(self._q[moved], q_next, delta_nfe, self.rewards)
                self._q[moved] = q_next
            # 2. stop: terminal bonus on the decoded x̂0; the episode restarts in the next step
            done[stopped] = True
            rewards[stopped] = stop_reward(self._q[stopped], self.rewards)
            self._ret[live] += rewards[live]
            self._len[live] += 1
        infos: dict[str, Any] = {}
        if done.any():
            # the final image's raw components (stop scored it) against the first x̂0's
            delta = self._watched(self.episodes) - self._first
            infos["final_episode"] = {
                "r": np.where(done, self._ret, 0.0).astype(np.float32),
                "l": np.where(done, self._len, 0).astype(np.int64),
                "nfe": np.where(done, [ep.nfe for ep in self.episodes], 0).astype(np.int64),
                **{
                    f"{k}_delta": np.where(done, delta[:, j], 0.0).astype(np.float32)
                    for j, k in enumerate(WATCHED)
                },
            }
            infos["_final_episode"] = done.copy()

        # 3. next-step autoreset: the sub-envs that ended in the previous step start anew
        if restart.any():
            self._start([int(i) for i in np.flatnonzero(restart)])
        self._autoreset = done
        obs = self._observe()
        return obs, rewards, done, np.zeros(n, bool), infos

    def close_extras(self, **kwargs: Any) -> None:
        self.episodes = []
