"""End to end on tiny models: a real (2-step) DiscreteIQL run, then a 2-iteration fine-tune
through the CLI; outputs load, tampering is refused, same seed gives the same actor."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from online_finetune_consts import OBS_DIM, PROMPTS, STATS
from online_finetune_offline import train_tiny_offline

from addiffusion.cli import main
from addiffusion.offline_rl.policy import load_policy
from addiffusion.online_finetune.config import OnlineFinetuneConfig
from addiffusion.online_finetune.env import SamplerVectorEnv
from addiffusion.online_finetune.finetune import finetune
from addiffusion.online_finetune.offline_init import (
    check_action_table,
    load_offline_actor,
    load_offline_networks,
)
from addiffusion.online_finetune.ppo import build_maskable_ppo, load_finetuned_policy
from addiffusion.online_finetune.sb3_adapter import Sb3VecEnv
from addiffusion.rewards.config import RewardConfig

CFG_SMALL = OnlineFinetuneConfig(n_envs=2, n_steps=4, batch_size=4, device="cpu")
CFG = {
    "n_envs": 2,
    "n_steps": 4,
    "iterations": 2,
    "batch_size": 4,
    "n_epochs": 2,
    "device": "cpu",
    "seeds": [1],
}


@pytest.fixture(scope="module")
def offline_dir(tmp_path_factory: pytest.TempPathFactory, sampler) -> Path:
    """A real DiscreteIQL run (2 gradient steps) on random transitions of the env's obs dim,
    over the test MDP's action table."""
    return train_tiny_offline(tmp_path_factory.mktemp("offline"), sampler.table)


def test_ppo_starts_as_the_iql_actor_and_value(offline_dir: Path, sampler) -> None:
    nets = load_offline_networks(offline_dir)
    actor, critic = nets.actor, nets.critic
    assert actor.spec.hidden_sizes == (16, 16) and actor.spec.standardize
    assert critic is not None and critic.spec.n_actions == 1
    iql = load_policy(offline_dir / "policy.d3")
    obs = np.random.default_rng(1).standard_normal((16, OBS_DIM)).astype(np.float32)
    t = sampler.table
    mask = np.ones((16, t.n), bool)
    mask[::2, t.refine] = False
    impl = iql.algo.impl
    with torch.no_grad():
        v_iql = impl.predict_state_value(
            iql.algo.observation_scaler.transform(torch.from_numpy(obs))
        )
        env = SamplerVectorEnv(sampler, PROMPTS, 2, RewardConfig(), STATS, seed=0)
        ppo = build_maskable_ppo(Sb3VecEnv(env), actor, CFG_SMALL, "cpu", critic=critic)
        dist = ppo.policy.get_distribution(torch.from_numpy(obs), action_masks=mask)
        np.testing.assert_allclose(dist.distribution.probs, iql.action_probs(obs, mask), atol=1e-5)
        values = ppo.policy.predict_values(torch.from_numpy(obs)).view(-1)
        np.testing.assert_allclose(values, v_iql, rtol=1e-4, atol=1e-5)
    assert load_offline_actor(offline_dir, t).spec == actor.spec
    assert actor.spec.n_actions == t.n


def test_offline_run_on_another_action_table_is_refused(offline_dir: Path, sampler) -> None:
    from addiffusion.diffusion.actions import ActionTable

    t = sampler.table
    manifest = json.loads((offline_dir / "manifest.json").read_text())
    where = offline_dir / "manifest.json"
    other = ActionTable.build((1,), t.n_max, t.warmup, t.refine_budget, 2)
    if "actions" in manifest:
        with pytest.raises(ValueError, match="another action table.*jump-1', 'stop', 'refine'"):
            check_action_table({**manifest, "actions": other.to_dict()}, t, where)
    with pytest.raises(ValueError, match="action_size 3, but the dataset's action table has 5"):
        check_action_table({"action_size": 3}, t, where)
    check_action_table({"action_size": t.n}, t, where)  # older manifests: the size must match
    with pytest.raises(ValueError, match="action_size|another action table"):
        load_offline_networks(offline_dir, other)


def test_cli_finetune_writes_loadable_outputs(
    tmp_path: Path, tiny_dataset: Path, offline_dir: Path
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"online_finetune": CFG, "rewards": {"c_nfe": 0.05}}))
    out = tmp_path / "ft"
    args = [
        "online-finetune",
        "--dataset",
        str(tiny_dataset),
        "--offline",
        str(offline_dir),
        "--out",
        str(out),
        "--params",
        str(params),
        "--quiet",
        "--threads",
        "1",
    ]
    assert main(args) == 0

    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["iterations"] == 2 and len(metrics["history"]) == 2
    assert metrics["global_step"] == 2 * 2 * 4
    row = metrics["history"][-1]
    for key in (
        "charts/episodic_return",
        "charts/episodic_nfe",
        "losses/approx_kl",
        "losses/entropy",
        "losses/value_loss",
    ):
        assert key in row
    # 8 decisions per iteration on n_max = 6 episodes: some finish, each with 2..6 NFE
    assert sum(r["charts/episodes"] for r in metrics["history"]) >= 1
    nfes = [r["charts/episodic_nfe"] for r in metrics["history"] if r["charts/episodes"]]
    assert all(2 <= v <= 6 for v in nfes)
    assert (out / "training.csv").read_text().count("\n") == 3

    policy = load_finetuned_policy(out)
    assert policy.manifest["source"]["sampler"]["n_max"] == 6
    t = policy.table
    assert t.strides == (1, 2, 4) and policy.action_size == t.n == 5
    obs = np.random.default_rng(2).standard_normal((5, OBS_DIM)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [0, 0, 0, 1, 0], [1, 0, 0, 1, 0], [1] * 5, [0, 0, 1, 1, 1]])
    mask = mask.astype(bool)
    acts = policy.act(obs, mask)
    assert mask[np.arange(5), acts].all()

    # seeded: the library call with the same config reproduces the actor bit for bit
    again = tmp_path / "again"
    finetune(
        tiny_dataset,
        offline_dir,
        OnlineFinetuneConfig.from_dict(CFG),
        again,
        rewards=RewardConfig(c_nfe=0.05),
    )
    assert (again / "actor.safetensors").read_bytes() == (out / "actor.safetensors").read_bytes()

    manifest = json.loads((out / "manifest.json").read_text())
    manifest["sha256"] = "0" * 64
    (out / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ValueError, match="does not match"):
        load_finetuned_policy(out)


def test_cli_help_and_bad_params(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["online-finetune", "--help"])
    assert "MaskablePPO" in capsys.readouterr().out
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"online_finetune": {"n_envs": 0}}))
    code = main(
        [
            "online-finetune",
            "--dataset",
            "d",
            "--offline",
            "o",
            "--out",
            "x",
            "--params",
            str(params),
        ]
    )
    assert code == 2
    assert "online_finetune.n_envs must be >= 1, got 0" in capsys.readouterr().err
