"""MaskablePPO starts as the given actor; the fine-tuned actor's files and loader."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from online_finetune_consts import PROMPTS, STATS
from torch import nn

from addiffusion.offline_rl.policy import PolicyLoadError
from addiffusion.online_finetune.ablation import Ablation
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

CFG = OnlineFinetuneConfig(n_envs=2, n_steps=4, batch_size=4, n_epochs=2, iterations=1, seeds=(0,))


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


def test_saved_actor_applies_its_ablation(tmp_path, venv: Sb3VecEnv) -> None:
    """An actor saved with an ablation records it; loaded, it zeroes the dropped observation
    parts before the actor sees them and never takes an action outside the allowed ones."""
    env = venv.env
    dim, t = env.single_observation_space.shape[0], env.table
    actor = mlp_actor_from_module(tiny_actor(dim, t.n, nn.ReLU))
    ablation = Ablation(("jump-1", "stop"), ("quality",), env.layout)
    save_actor(actor, t, tmp_path, ablation=ablation)
    manifest = json.loads((tmp_path / "manifest.json").read_text())
    assert manifest["version"] == 3 and manifest["allowed_actions"] == ["jump-1", "stop"]
    assert manifest["observation_drop"] == ["quality"]
    assert manifest["observation"] == env.layout.to_dict()
    policy = load_finetuned_policy(tmp_path)
    keep = env.layout.keep_mask(["quality"])
    np.testing.assert_array_equal(policy.keep, keep)
    np.testing.assert_array_equal(policy.allowed, t.allowed("stop_only"))

    obs = np.random.default_rng(0).standard_normal((64, dim)).astype(np.float32)
    other = obs.copy()
    other[:, ~keep] += 5.0  # the dropped part: no effect
    np.testing.assert_array_equal(policy.logits(obs), policy.logits(other))
    with torch.no_grad():
        zeroed = np.where(keep, obs, 0).astype(np.float32)
        np.testing.assert_allclose(policy.logits(obs), actor(torch.from_numpy(zeroed)), atol=1e-6)
    full = np.ones((64, t.n), bool)
    assert set(policy.act(obs, full).tolist()) <= {t.jump(1), t.stop}
    sampled = policy.act(obs, full, rng=np.random.default_rng(0))
    assert set(sampled.tolist()) <= {t.jump(1), t.stop}
    # a row the allowed set would empty keeps its own mask (the offline policy's rule)
    only_refine = np.zeros((64, t.n), bool)
    only_refine[:, t.refine] = True
    assert (policy.act(obs, only_refine) == t.refine).all()


def test_manifest_ablation_errors_and_version_2(tmp_path, venv: Sb3VecEnv) -> None:
    env = venv.env
    dim, t = env.single_observation_space.shape[0], env.table
    actor = mlp_actor_from_module(tiny_actor(dim, t.n))
    save_actor(actor, t, tmp_path)
    path = tmp_path / "manifest.json"
    manifest = json.loads(path.read_text())
    assert manifest["allowed_actions"] is None and manifest["observation_drop"] == []
    policy = load_finetuned_policy(tmp_path)
    assert policy.allowed is None and policy.keep is None
    # version 2 (before ablations): loads, unrestricted
    old = {k: v for k, v in manifest.items() if k not in Ablation().to_manifest()}
    path.write_text(json.dumps({**old, "version": 2}))
    assert load_finetuned_policy(tmp_path).allowed is None
    for bad, message in [
        ({"allowed_actions": ["jump-3"]}, "unknown action 'jump-3'"),
        ({"observation_drop": ["colour"]}, "unknown observation part 'colour'"),
        ({"observation_drop": ["quality"], "observation": None}, "no 'observation' entry"),
        ({"version": 1}, "version 2 or 3"),
    ]:
        path.write_text(json.dumps({**manifest, **bad}))
        with pytest.raises((ValueError, PolicyLoadError), match=message):
            load_finetuned_policy(tmp_path)
    with pytest.raises(ValueError, match="needs the observation layout"):
        Ablation(observation_drop=("quality",))


def test_fresh_ppo_keeps_architecture_and_standardisation(venv: Sb3VecEnv) -> None:
    """``fresh=True`` (the from-scratch baseline): the actor's and critic's architecture and the
    observation standardisation, SB3's own init, reproducible per seed."""
    dim, t = venv.observation_space.shape[0], venv.env.table
    mean, std = torch.randn(dim), torch.rand(dim) + 0.5
    actor = mlp_actor_from_module(tiny_actor(dim, t.n), mean, std)
    torch.manual_seed(2)
    critic = mlp_actor_from_module(
        nn.Sequential(nn.Linear(dim, 12), nn.Tanh(), nn.Linear(12, 1)), mean, std
    )
    model = build_maskable_ppo(venv, actor, CFG, "cpu", critic=critic, seed=3, fresh=True)
    assert model.policy.net_arch == {"pi": [16, 8], "vf": [12]}
    assert model.policy.activation_fn is nn.Tanh
    back = actor_from_ppo(model, actor.spec)
    assert torch.equal(back.standardize.mean, mean) and torch.equal(back.standardize.std, std)
    assert not torch.equal(back.head.weight, actor.head.weight)
    again = actor_from_ppo(
        build_maskable_ppo(venv, actor, CFG, "cpu", critic=critic, seed=3, fresh=True), actor.spec
    )
    other = actor_from_ppo(
        build_maskable_ppo(venv, actor, CFG, "cpu", critic=critic, seed=4, fresh=True), actor.spec
    )
    for a, b in zip(back.state_dict().values(), again.state_dict().values(), strict=True):
        assert torch.equal(a, b)
    assert not torch.equal(back.head.weight, other.head.weight)
