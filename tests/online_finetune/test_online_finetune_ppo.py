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


def tiny_actor(dim: int, n: int, activation: type[nn.Module] = nn.Tanh) -> nn.Sequential:
    torch.manual_seed(1)
    return nn.Sequential(
        nn.Linear(dim, 16), activation(), nn.Linear(16, 8), activation(), nn.Linear(8, n)
    )


@pytest.fixture
def venv(sampler) -> Sb3VecEnv:
    return Sb3VecEnv(SamplerVectorEnv(sampler, PROMPTS, 2, RewardConfig(), STATS, seed=0))


def test_ppo_starts_as_the_actor(venv: Sb3VecEnv) -> None:
    dim, t = venv.observation_space.shape[0], venv.env.table
    net = tiny_actor(dim, t.n)
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
        legal = [*t.jumps, t.stop]
        mask = np.zeros((64, t.n), bool)
        mask[:, legal] = True
        masked = model.policy.get_distribution(obs, action_masks=mask).distribution.probs
        renorm = expected[:, legal] / expected[:, legal].sum(-1, keepdim=True)
        np.testing.assert_allclose(masked[:, legal], renorm, atol=1e-6)
        assert (masked[:, t.refine] == 0).all()
        # and back out again, unchanged
        back = actor_from_ppo(model, actor.spec)
        np.testing.assert_allclose(back(obs), policy_logits(model, obs), atol=1e-6)


def test_actor_shapes_are_checked(venv: Sb3VecEnv) -> None:
    dim, n = venv.observation_space.shape[0], venv.env.table.n
    with pytest.raises(ValueError, match="observations of dim 7"):
        build_maskable_ppo(venv, mlp_actor_from_module(tiny_actor(7, n)), CFG, "cpu")
    with pytest.raises(ValueError, match=f"3 logits, the env's action space has {n} actions"):
        build_maskable_ppo(venv, mlp_actor_from_module(tiny_actor(dim, 3)), CFG, "cpu")
    with pytest.raises(ValueError, match="LayerNorm"):
        mlp_actor_from_module(nn.Sequential(nn.Linear(dim, 4), nn.LayerNorm(4), nn.Linear(4, 3)))
    with pytest.raises(ValueError, match="mixes activations"):
        mlp_actor_from_module(
            nn.Sequential(nn.Linear(4, 4), nn.ReLU(), nn.Linear(4, 4), nn.Tanh(), nn.Linear(4, n))
        )


def test_saved_actor_roundtrip_and_tamper(tmp_path, venv: Sb3VecEnv) -> None:
    dim, t = venv.observation_space.shape[0], venv.env.table
    net = tiny_actor(dim, t.n, nn.ReLU)
    actor = mlp_actor_from_module(net, torch.zeros(dim), torch.ones(dim) * 2)
    with pytest.raises(ValueError, match="logits but the action table"):
        save_actor(mlp_actor_from_module(tiny_actor(dim, 3)), t, tmp_path / "bad")
    save_actor(actor, t, tmp_path)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["obs_dim"] == dim and manifest["architecture"]["hidden_sizes"] == [16, 8]
    assert manifest["actions"] == t.to_dict() and manifest["action_size"] == t.n
    policy = load_finetuned_policy(tmp_path)
    assert policy.table == t and policy.action_size == t.n
    obs = np.random.default_rng(0).standard_normal((32, dim)).astype(np.float32)
    with torch.no_grad():
        np.testing.assert_allclose(policy.logits(obs), actor(torch.from_numpy(obs)), atol=1e-6)
    mask = np.zeros((32, t.n), bool)
    mask[:16, t.stop] = True
    mask[16:, [t.jump(4), t.refine]] = True
    acts = policy.act(obs, mask)
    assert acts.shape == (32,) and mask[np.arange(32), acts].all()
    sampled = policy.act(obs, mask, rng=np.random.default_rng(0))
    assert mask[np.arange(32), sampled].all()
    with pytest.raises(ValueError, match="allow no action"):
        policy.act(obs, np.zeros((32, t.n), bool))
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
    actor = mlp_actor_from_module(tiny_actor(dim, venv.env.table.n), mean, std)
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


def test_maskable_ppo_runs_a_few_iterations(venv: Sb3VecEnv) -> None:
    """Two rollout + update iterations on the live env: every sampled action is legal (the env
    raises on an illegal one), episodes finish, and the policy moves."""
    dim, t = venv.observation_space.shape[0], venv.env.table
    actor = mlp_actor_from_module(tiny_actor(dim, t.n))
    model = build_maskable_ppo(venv, actor, CFG, "cpu")
    before = [p.detach().clone() for p in model.policy.action_net.parameters()]
    taken: list[int] = []
    real = venv.env.step

    def spy(actions):
        taken.extend(np.asarray(actions).tolist())
        return real(actions)

    venv.env.step = spy  # type: ignore[method-assign]
    model.learn(2 * CFG.steps_per_iteration)
    assert model.num_timesteps == 2 * CFG.steps_per_iteration
    assert len(taken) == model.num_timesteps and set(taken) <= set(range(t.n))
    after = list(model.policy.action_net.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True))
