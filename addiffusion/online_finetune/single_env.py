"""A single-episode gymnasium env over the stepwise sampler: one episode = one (prompt, seed).

It is a :class:`SamplerVectorEnv` of one sub-env seen through the ``gymnasium.Env`` API, so the
actions (the sampler's action table), the observation and the reward are the vector env's, and
gymnasium's and SB3's ``check_env``, ``gymnasium.make`` and single-env libraries apply. Registered
as ``addiffusion/Sampler-v0`` when :mod:`addiffusion.online_finetune` is imported::

    import gymnasium as gym
    import addiffusion.online_finetune  # registers the id (or: gym.make("addiffusion.online_finetune:addiffusion/Sampler-v0", ...))

    env = gym.make("addiffusion/Sampler-v0", dataset="data/dataset", device="cuda")
    obs, info = env.reset(seed=0)  # info: the episode's prompt and noise seed
    mask = env.unwrapped.action_masks()  # (table.n,) bool, sb3-contrib MaskablePPO's convention

Masked actions: an action of the action space that the mask forbids (``action_space.sample()``
draws them) is replaced by the fallback evaluation uses, jump-1 if legal else stop, and reported in
``info`` (``action``: the id that ran, ``action_replaced``: True); ids outside the action space
raise. Sample with ``action_space.sample(mask=action_masks().astype(np.int8))`` to stay legal.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np

from addiffusion.diffusion.sampler import Episode, StepwiseSampler
from addiffusion.eval.rollout import legal_or_fallback  # eval's masked-action rule
from addiffusion.online_finetune.env import SamplerVectorEnv
from addiffusion.rewards.config import RewardConfig

RESET_OPTIONS = ("prompt", "noise_seed")
"""Keys ``SamplerEnv.reset`` reads from ``options``."""


class SamplerEnv(gym.Env):
    """One denoising episode of ``sampler`` per ``reset``.

    Observation: ``(obs_dim,)`` float32 (the MDP observation). Action: an id of the sampler's
    action table (``Discrete(table.n)``); masked ones fall back (module docstring). Reward: the
    vector env's (``step_reward`` per move, ``stop_reward`` on stop). The episode terminates on
    stop (the only action at the last grid point), so it never truncates. ``reset`` draws the
    prompt from ``prompts`` and the noise seed from the env's ``np_random``; ``options`` may fix
    them (``prompt``, ``noise_seed``). ``render()`` (``render_mode="rgb_array"``): the current
    x̂0 as ``(H, W, 3)`` uint8.
    """

    metadata: dict[str, Any] = {"render_modes": ["rgb_array"], "render_fps": 4}

    def __init__(
        self,
        sampler: StepwiseSampler,
        prompts: Sequence[str],
        rewards: RewardConfig,
        stats: Mapping[str, Mapping[str, float]] | None,
        render_mode: str | None = None,
    ) -> None:
        if render_mode is not None and render_mode not in self.metadata["render_modes"]:
            raise ValueError(
                f"render_mode must be one of {self.metadata['render_modes']} or None, "
                f"got {render_mode!r}"
            )
        self.vec = SamplerVectorEnv(sampler, prompts, 1, rewards, stats)
        self.table = self.vec.table
        self.prompts = self.vec.prompts
        self.observation_space = self.vec.single_observation_space
        self.action_space = self.vec.single_action_space
        self.render_mode = render_mode
        self._ended = True  # no episode yet: reset() first

    @property
    def episode(self) -> Episode | None:
        """The current :class:`Episode` (``None`` before the first ``reset``)."""
        return self.vec.episodes[0] if self.vec.episodes else None

    def reset(
        self, *, seed: int | None = None, options: dict[str, Any] | None = None
    ) -> tuple[np.ndarray, dict[str, Any]]:
        super().reset(seed=seed)
        options = dict(options or {})
        unknown = sorted(set(options) - set(RESET_OPTIONS))
        if unknown:
            raise ValueError(
                f"unknown reset option {unknown[0]!r}; expected some of {', '.join(RESET_OPTIONS)}"
            )
        prompt = options.get("prompt")
        if prompt is None:
            prompt = self.prompts[int(self.np_random.integers(len(self.prompts)))]
        noise_seed = options.get("noise_seed")
        if noise_seed is None:
            noise_seed = int(self.np_random.integers(0, 2**31 - 1))
        obs, _ = self.vec.reset(options={"prompts": [prompt], "seeds": [int(noise_seed)]})
        self._ended = False
        return obs[0], {"prompt": prompt, "noise_seed": int(noise_seed)}

    def action_masks(self) -> np.ndarray:
        """``(table.n,)`` bool: the legal actions now (all False once the episode has ended)."""
        if self.episode is None:
            raise RuntimeError("call reset() before action_masks()")
        return self.vec.sampler.action_masks([self.episode])[0]

    def step(self, action: Any) -> tuple[np.ndarray, float, bool, bool, dict[str, Any]]:
        if self._ended:
            raise RuntimeError("the episode has ended (or never started): call reset() first")
        if not self.action_space.contains(action):
            raise ValueError(
                f"action {action!r} is not in the action space {self.action_space} "
                f"(ids of {list(self.table.names)})"
            )
        given = np.array([int(action)], np.int64)
        taken, replaced = legal_or_fallback(given, self.action_masks()[None], self.table)
        obs, rewards, terminated, truncated, _ = self.vec.step(taken)
        self._ended = bool(terminated[0] or truncated[0])
        info = {"action": int(taken[0]), "action_replaced": bool(replaced), "nfe": self.episode.nfe}
        return obs[0], float(rewards[0]), bool(terminated[0]), bool(truncated[0]), info

    def render(self) -> np.ndarray | None:
        if self.render_mode is None:
            return None
        if self.episode is None:
            raise RuntimeError("call reset() before render()")
        return self.episode.image

    def close(self) -> None:
        self.vec.close()


def make_sampler_env(
    dataset: str | Path,
    device: str = "auto",
    rewards: RewardConfig | Mapping[str, Any] | None = None,
    prompts: Sequence[str] | None = None,
    render_mode: str | None = None,
) -> SamplerEnv:
    """The entry point of ``addiffusion/Sampler-v0``: a :class:`SamplerEnv` on the MDP of the built
    dataset at ``dataset`` (its task and sampler, :func:`load_dataset_mdp`).

    ``rewards``: the ``rewards`` section of ``params.yaml`` (a mapping or a
    :class:`RewardConfig`; None = its defaults). ``prompts``: None = the dataset's train prompts.
    """
    from addiffusion.online_finetune.dataset_mdp import load_dataset_mdp

    if rewards is None:
        rewards = RewardConfig()
    elif not isinstance(rewards, RewardConfig):
        rewards = RewardConfig.from_dict(dict(rewards))
    live = load_dataset_mdp(Path(dataset), device, rewards)
    chosen = live.prompts if prompts is None else tuple(prompts)
    return SamplerEnv(live.sampler, chosen, rewards, live.task.component_stats, render_mode)
