"""MaskablePPO starts as the given actor; the fine-tuned actor's files and loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from online_finetune_consts import PROMPTS, STATS
from torch import nn

from addiffusion.online_finetune.actor import mlp_actor_from_module
from addiffusion.online_finetune.config import OnlineFinetuneConfig
from addiffusion.online_finetune.env import SamplerVectorEnv
from addiffusion.online_finetune.ppo import (
    actor_from_ppo,
    build_maskable_ppo,
    load_finetuned_policy,
    policy_logits,
    save_actor,
)
from addiffusion.online_finetune.sb3_adapter import Sb3VecEnv
from addiffusion.rewards.config import RewardConfig

CFG = OnlineFinetuneConfig(n_envs=2, n_steps=4, batch_size=4, n_epochs=2, iterations=1, seed=0)


def tiny_actor(dim: int, activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(dim, 16), activation(), nn.Linear(16, 8), activation(), nn.Linear(8, 3)
    )


@pytest.fixture
def venv(sampler) -> Sb3VecEnv:
    return Sb3VecEnv(SamplerVectorEnv(sampler, PROMPTS, 2, RewardConfig(), STATS, seed=0))


def test_ppo_starts_as_the_actor(venv: Sb3VecEnv) -> None:
    dim = venv.observation_space.shape[0]
    net = tiny_actor(dim)
    mean, std = torch.randn(dim), torch.rand(dim) + 0.5
    actor = mlp_actor_from_module(net, mean, std)
    obs = torch.randn(64, dim) * 3
    with torch.no_grad():
        expected = torch.softmax(net((obs - mean) / std), dim=-1)
        np.testing.assert_allclose(torch.softmax(actor(obs), -1), expected, atol=1e-6)
        model = build_maskable_ppo(venv, actor, CFG, "cpu")
        assert model.policy.net_arch == {"pi": [16, 8], "vf": [16, 8]}
        assert model.policy.activation_fn is nn.Tanh
        probs = model.policy.get_distribution(obs).distribution.probs
        np.testing.assert_allclose(probs, expected, atol=1e-6)
        # masked: the same distribution renormalised over the legal actions
        mask = np.tile([True, True, False], (64, 1))
        masked = model.policy.get_distribution(obs, action_masks=mask).distribution.probs
        renorm = expected[:, :2] / expected[:, :2].sum(-1, keepdim=True)
        np.testing.assert_allclose(masked[:, :2], renorm, atol=1e-6)
        assert (masked[:, 2] == 0).all()
        # and back out again, unchanged
        back = actor_from_ppo(model, actor.spec)
        np.testing.assert_allclose(back(obs), policy_logits(model, obs), atol=1e-6)


def test_actor_shapes_are_checked(venv: Sb3VecEnv) -> None:
    dim = venv.observation_space.shape[0]
    with pytest.raises(ValueError, match="observations of dim 7"):
        build_maskable_ppo(venv, mlp_actor_from_module(tiny_actor(7)), CFG, "cpu")
    with pytest.raises(ValueError, match="LayerNorm"):
        mlp_actor_from_module(nn.Sequential(nn.Linear(dim, 4), nn.LayerNorm(4), nn.Linear(4, 3)))
    with pytest.raises(ValueError, match="mixes activations"):
        mlp_actor_from_module(
            nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, 3))
        )


def test_saved_actor_roundtrip_and_tamper(tmp_path, venv: Sb3VecEnv) -> None:
    dim = venv.observation_space.shape[0]
    actor = mlp_actor_from_module(tiny_actor(dim, nn.ReLU), torch.zeros(dim), torch.ones(dim) * 2)
    save_actor(actor, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["obs_dim"] == dim and manifest["architecture"]["hidden_sizes"] == [16, 8]
    policy = load_finetuned_policy(tmp_path)
    obs = np.random.default_rng(0).standard_normal((32, dim)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(policy.logits(obs), actor(torch.from_numpy(obs)), atol=1e-6)
    mask = np.zeros((32, 3), bool)
    mask[:16, 1] = True
    mask[16:, [0, 2]] = True
    acts = policy.act(obs, mask)
    assert acts.shape == (32,) and mask[np.arange(32), acts].all()
    sampled = policy.act(obs, mask, rng=np.random.default_rng(0))
    assert mask[np.arange(32), sampled].all()
    with pytest.raises(ValueError, match="allow no action"):
        policy.act(obs, np.zeros((32, 3), bool))
    # one flipped byte in the weights: refused
    weights = tmp_path / "actor.safetensors"
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match="sha256"):
        load_finetuned_policy(tmp_path)


def test_critic_init(venv: Sb3VecEnv) -> None:
    dim = venv.observation_space.shape[0]
    mean, std = torch.randn(dim), torch.rand(dim) + 0.5
    actor = mlp_actor_from_module(tiny_actor(dim), mean, std)
    torch.manual_seed(2)
    v_net = nn.Sequential(nn.Linear(dim, 12), nn.Tanh(), nn.Linear(12, 1))
    critic = mlp_actor_from_module(v_net, mean, std)
    model = build_maskable_ppo(venv, actor, CFG, "cpu", critic=critic)
    assert model.policy.net_arch == {"pi": [16, 8], "vf": [12]}
    obs = torch.randn(8, dim)
    with torch.no_grad():
        np.testing.assert_allclose(
            model.policy.predict_values(obs), v_net((obs - mean) / std), atol=1e-6
        )
    with pytest.raises(ValueError, match="one value"):
        build_maskable_ppo(venv, actor, CFG, "cpu", critic=actor)
    other = mlp_actor_from_module(v_net, mean + 1, std)
    with pytest.raises(ValueError, match="standardise observations identically"):
        build_maskable_ppo(venv, actor, CFG, "cpu", critic=other)
