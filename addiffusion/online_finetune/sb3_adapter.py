"""A thin adapter from :class:`SamplerVectorEnv` (gymnasium vector API) to SB3's ``VecEnv``.

SB3 drives its own ``VecEnv`` interface: ``reset() -> obs``, ``step() -> (obs, rewards, dones,
list of info dicts)`` with the terminal observation in ``info["terminal_observation"]`` and
episode statistics in ``info["episode"]`` (read by ``ep_info_buffer``; here every key of the
vector env's ``final_episode``: ``r``, ``l``, ``nfe``, ``clip_score_delta``, ``verifier_delta``).
SB3 autoresets in the same step, the vector env in the next one: after a step that ends
episodes, the adapter restarts those sub-envs at once with
``reset(options={"reset_mask": dones})`` (the step's observation of them is the terminal one),
and reshapes the infos. MaskablePPO fetches masks with
``env_method("action_masks")`` (``sb3_contrib.common.maskable.utils.get_action_masks``), which
expects one ``(table.n,)`` mask per sub-env.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

import gymnasium as gym
import numpy as np
from stable_baselines3.common.vec_env import VecEnv
from stable_baselines3.common.vec_env.base_vec_env import VecEnvIndices, VecEnvStepReturn

from addiffusion.online_finetune.env import SamplerVectorEnv


class Sb3VecEnv(VecEnv):
    """SB3 view of a :class:`SamplerVectorEnv` (which does the work)."""

    def __init__(self, env: SamplerVectorEnv) -> None:
        self.env = env
        self._actions: np.ndarray | None = None
        self._tic = time.perf_counter()
        super().__init__(env.num_envs, env.single_observation_space, env.single_action_space)

    def reset(self) -> np.ndarray:
        # SB3 sets per-env seeds (seed + i) through .seed(); the vector env takes one seed.
        seed = self._seeds[0]
        obs, _ = self.env.reset(seed=seed)
        self._reset_seeds()
        self.reset_infos = [{} for _ in range(self.num_envs)]
        return obs

    def step_async(self, actions: np.ndarray) -> None:
        self._actions = np.asarray(actions)

    def step_wait(self) -> VecEnvStepReturn:
        if self._actions is None:
            raise RuntimeError("step_wait() called without step_async()")
        obs, rewards, terminated, truncated, infos = self.env.step(self._actions)
        self._actions = None
        dones = terminated | truncated
        out: list[dict[str, Any]] = [{} for _ in range(self.num_envs)]
        if dones.any():
            ended = infos.get("_final_episode", np.zeros(self.num_envs, bool))
            for i in np.flatnonzero(dones):
                out[i]["terminal_observation"] = obs[i].copy()
                out[i]["TimeLimit.truncated"] = bool(truncated[i] and not terminated[i])
                if ended[i]:  # r, l, nfe and the hacking watch's deltas, as Python numbers
                    ep = {k: v[i].item() for k, v in infos["final_episode"].items()}
                    out[i]["episode"] = {**ep, "t": round(time.perf_counter() - self._tic, 6)}
            # SB3's same-step autoreset: the finished sub-envs' next episodes start now
            obs, _ = self.env.reset(options={"reset_mask": dones})
        return obs, rewards.astype(np.float32), dones, out

    def close(self) -> None:
        self.env.close()

    def _indices(self, indices: VecEnvIndices) -> list[int]:
        return list(self._get_indices(indices))

    def get_attr(self, attr_name: str, indices: VecEnvIndices = None) -> list[Any]:
        value = getattr(self.env, attr_name)  # AttributeError is how SB3's has_attr says "no"
        return [value for _ in self._indices(indices)]

    def set_attr(self, attr_name: str, value: Any, indices: VecEnvIndices = None) -> None:
        raise AttributeError(
            f"set_attr({attr_name!r}): the sub-envs of a SamplerVectorEnv share one sampler; "
            "configure the SamplerVectorEnv itself"
        )

    def env_method(
        self,
        method_name: str,
        *method_args: Any,
        indices: VecEnvIndices = None,
        **method_kwargs: Any,
    ) -> list[Any]:
        """Call a batched method of the vector env and split its result per sub-env.

        ``env_method("action_masks")`` -> a list of ``(table.n,)`` bool masks, one per index.
        """
        result = getattr(self.env, method_name)(*method_args, **method_kwargs)
        if not (isinstance(result, np.ndarray) and result.shape[:1] == (self.num_envs,)):
            raise TypeError(
                f"env_method({method_name!r}) needs a batched result of leading dim "
                f"{self.num_envs}, got {type(result).__name__}"
            )
        return [result[i] for i in self._indices(indices)]

    def env_is_wrapped(
        self, wrapper_class: type[gym.Wrapper], indices: VecEnvIndices = None
    ) -> list[bool]:
        return [False for _ in self._indices(indices)]

    def get_images(self) -> Sequence[np.ndarray | None]:
        return [ep.image for ep in self.env.episodes]
