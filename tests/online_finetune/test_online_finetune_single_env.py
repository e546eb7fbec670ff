"""The single-episode gymnasium env (tiny models, n_max = 6, strides 1/2/4: jump-1, jump-2,
jump-4, stop, refine): both check_envs, ``gymnasium.make`` by id, masked actions, MaskablePPO."""

from __future__ import annotations

import warnings
from pathlib import Path

import gymnasium as gym
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from online_finetune_consts import N_MAX, PROMPTS, STATS
from sb3_contrib import MaskablePPO
from sb3_contrib.common.maskable.utils import get_action_masks
from stable_baselines3.common.env_checker import check_env as sb3_check_env
from stable_baselines3.common.vec_env import DummyVecEnv

from addiffusion.online_finetune import ENV_ID
from addiffusion.online_finetune.env import SamplerVectorEnv
from addiffusion.online_finetune.single_env import SamplerEnv
from addiffusion.rewards.config import RewardConfig

REWARDS = RewardConfig(weights={"clip_score": 1.0, "stability": 0.5}, c_nfe=0.05)
INF_BOUNDS = "A Box observation space m.*infinity"
"""gymnasium's hint on the unbounded observation space (CLIP features and quality terms have no
declared bounds), the one warning its checker may give."""


def make_env(sampler) -> SamplerEnv:
    return SamplerEnv(sampler, PROMPTS, REWARDS, STATS)


def test_gymnasium_check_env_via_make(tiny_dataset: Path) -> None:
    """``gymnasium.make`` by id (the spec lets the checker also make the render and close envs)."""
    env = gym.make(ENV_ID, dataset=str(tiny_dataset), device="cpu", rewards={"c_nfe": 0.05})
    assert env.spec is not None and env.spec.id == ENV_ID
    inner = env.unwrapped
    assert isinstance(inner, SamplerEnv)
    assert inner.observation_space.shape == (85,)  # the dataset's recorded layout
    assert inner.action_space.n == inner.table.n == 5
    assert inner.prompts == [PROMPTS[0], PROMPTS[1], PROMPTS[2]]  # train split, prompt-id order
    assert inner.vec.rewards == RewardConfig(c_nfe=0.05)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # any other checker warning fails the test
        warnings.filterwarnings("ignore", message=f".*{INF_BOUNDS}")
        gym_check_env(inner)
    obs, info = env.reset(seed=0)
    assert info["prompt"] in inner.prompts and obs.shape == (85,)
    assert get_action_masks(DummyVecEnv([lambda: env])).shape == (1, 5)  # through the wrappers
    env.close()


def test_sb3_check_env(sampler) -> None:
    sb3_check_env(make_env(sampler), warn=True)


def test_reset_draws_or_takes_the_task(sampler) -> None:
    env = make_env(sampler)
    a, info_a = env.reset(seed=3)
    b, info_b = env.reset(seed=3)
    np.testing.assert_array_equal(a, b)
    assert info_a == info_b and info_a["prompt"] in PROMPTS
    c, info_c = env.reset(options={"prompt": info_a["prompt"], "noise_seed": info_a["noise_seed"]})
    np.testing.assert_array_equal(a, c)
    assert (env.episode.prompt, env.episode.seed) == (info_a["prompt"], info_a["noise_seed"])
    with pytest.raises(ValueError, match="unknown reset option 'seed'"):
        env.reset(options={"seed": 1})


def test_rewards_are_the_vector_envs(sampler) -> None:
    """Same (prompt, seed) and actions: the single env's rewards and observations are those of a
    one-sub-env vector env."""
    env = make_env(sampler)
    t = env.table
    obs, info = env.reset(seed=1)
    vec = SamplerVectorEnv(sampler, PROMPTS, 1, REWARDS, STATS)
    vobs, _ = vec.reset(options={"prompts": [info["prompt"]], "seeds": [info["noise_seed"]]})
    np.testing.assert_array_equal(obs, vobs[0])
    total = 0.0
    for a in (t.jump(2), t.jump(1), t.stop):
        obs, r, term, trunc, info = env.step(a)
        vobs, vr, vterm, _, _ = vec.step(np.array([a]))
        np.testing.assert_array_equal(obs, vobs[0])
        assert r == pytest.approx(float(vr[0])) and term == bool(vterm[0]) and not trunc
        assert info == {"action": a, "action_replaced": False, "nfe": env.episode.nfe}
        total += r
    assert term and env.episode.nfe == 3  # point 0, 2, 3 evaluated
    assert total == pytest.approx(float(vec._ret[0]), rel=1e-5)


def test_masked_actions_fall_back(sampler) -> None:
    """A masked action is replaced by jump-1 if legal, else stop, and reported in info; ids
    outside the action space raise; stepping an ended episode raises."""
    env = make_env(sampler)
    twin = make_env(sampler)
    t = env.table
    _, info = env.reset(seed=0)
    twin.reset(options=info)
    assert not env.action_masks()[t.stop]  # warm-up: point 0 allows jumps only
    obs, r, _, _, info = env.step(t.stop)
    assert info["action"] == t.jump(1) and info["action_replaced"] is True
    tobs, tr, _, _, _ = twin.step(t.jump(1))
    np.testing.assert_array_equal(obs, tobs)
    assert r == tr
    env.step(t.jump(4))  # point 1 -> 5, the last point: only stop is legal
    np.testing.assert_array_equal(env.action_masks(), [a == t.stop for a in range(t.n)])
    _, _, term, _, info = env.step(t.jump(1))
    assert term and info["action"] == t.stop and info["action_replaced"] is True
    assert env.episode.step == N_MAX - 1 and not env.action_masks().any()
    with pytest.raises(RuntimeError, match="call reset"):
        env.step(t.jump(1))
    env.reset(seed=0)
    with pytest.raises(ValueError, match="not in the action space"):
        env.step(99)


def test_maskable_ppo_learns_on_the_single_env(sampler) -> None:
    """sb3-contrib finds ``action_masks`` and never samples a masked action."""
    env = make_env(sampler)
    replaced: list[bool] = []
    real = env.step

    def spy(action):
        out = real(action)
        replaced.append(out[4]["action_replaced"])
        return out

    env.step = spy  # type: ignore[method-assign]
    model = MaskablePPO("MlpPolicy", env, n_steps=8, batch_size=8, n_epochs=1, seed=0, device="cpu")
    model.learn(8)
    assert len(replaced) == 8 and not any(replaced)
