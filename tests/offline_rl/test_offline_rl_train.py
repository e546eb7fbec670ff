"""DiscreteIQL and the CQL/BC baselines on a synthetic stop-MDP with a known best stop step."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from offline_rl_stop_mdp import (
    BEST_STOP,
    N_STEPS,
    OBS_DIM,
    TABLE,
    WARMUP,
    episode_observations,
    make_buffer,
    stop_mask,
)

from addiffusion.offline_rl.config import FQEParams, OfflineRLConfig
from addiffusion.offline_rl.policy import (
    OfflinePolicy,
    PolicyLoadError,
    actor_logits_module,
    load_policy,
)
from addiffusion.offline_rl.train import train_offline

torch.set_num_threads(1)

DEFAULT = OfflineRLConfig()
# Tiny nets, few steps: converges on this MDP in 400 steps (checked over seeds 0-5).
TINY = dict(
    n_steps=400,
    n_steps_per_epoch=400,
    hidden_units=[32, 32],
    device="cpu",
    seeds=[0],
    fqe=FQEParams(n_steps=0),  # FQE of the runs: test_offline_rl_checkpoints.py
    iql={
        **DEFAULT.iql,
        "batch_size": 64,
        "actor_learning_rate": 3e-3,
        "critic_learning_rate": 3e-3,
        "tau": 0.05,
        "weight_temp": 10.0,
    },
    cql={**DEFAULT.cql, "batch_size": 64, "learning_rate": 3e-3, "target_update_interval": 100},
    bc={**DEFAULT.bc, "batch_size": 64, "learning_rate": 3e-3},
)


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("offline_rl")
    cfg = OfflineRLConfig(algo="iql", baselines=["cql", "bc"], **TINY)
    train_offline(
        make_buffer(80, seed=0), make_buffer(10, seed=1), cfg, out, actions=TABLE, log=True
    )
    return out


def _rollout(policy: OfflinePolicy, category: int, seed: int) -> np.ndarray:
    obs, _ = episode_observations(category, np.random.default_rng(seed), noise=0.05)
    return policy.act(obs, stop_mask(np.arange(N_STEPS)))


@pytest.mark.parametrize("category", sorted(BEST_STOP))
def test_iql_stops_at_the_best_step(run_dir: Path, category: int) -> None:
    policy = load_policy(run_dir / "policy.d3")
    k = BEST_STOP[category]
    for seed in range(5):  # fresh episodes, not in the training data
        actions = _rollout(policy, category, seed=100 + seed)
        assert actions[:k].tolist() == [0] * k, f"category {category}: {actions}"
        assert actions[k] == 1, f"category {category}: {actions}"


def test_metrics_and_baselines(run_dir: Path) -> None:
    metrics = json.loads((run_dir / "metrics.json").read_text())
    iql_stop = metrics["val"]["stop"]
    assert iql_stop["n_episodes"] == 10
    assert iql_stop["best_stop_rate"] >= 0.9 and iql_stop["regret"] < 0.05
    assert np.isfinite(metrics["val"]["td_error"]) and np.isfinite(metrics["losses"]["v_loss"])
    # CQL ran on the same data and wrote a loadable policy of its own.
    cql = load_policy(run_dir / "baselines" / "cql" / "policy.d3")
    assert cql.algo_name == "cql" and cql.observation_dim == OBS_DIM
    assert np.isfinite(metrics["baselines"]["cql"]["val"]["td_error"])
    assert (run_dir / "logs" / "iql" / "v_loss.csv").exists()
    assert (run_dir / "baselines" / "cql" / "logs" / "cql" / "loss.csv").exists()
    # Each state has both actions in the data, so BC sits near chance; IQL must beat it.
    bc_stop = metrics["baselines"]["bc"]["val"]["stop"]
    assert bc_stop["regret"] > iql_stop["regret"] + 0.5
    # One epoch, one seed, no ablation: no checkpoint, every action, the whole observation.
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["step"] == 400 and manifest["seed"] == 0 and manifest["checkpoints"] == []
    assert manifest["allowed_actions"] == list(TABLE.names)
    assert manifest["observation"] is None and manifest["observation_drop"] == []
    assert manifest["config"]["iql"]["weight_temp"] == 10.0
    assert manifest["config"]["cql"]["target_update_interval"] == 100
    assert metrics["fqe"] is None and not (run_dir / "ope.json").exists()  # fqe.n_steps = 0


@pytest.mark.parametrize("algo_dir", [".", "baselines/cql", "baselines/bc"])
def test_masked_actions_are_never_illegal(run_dir: Path, algo_dir: str) -> None:
    policy = load_policy(run_dir / algo_dir / "policy.d3")
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(256, OBS_DIM)).astype(np.float32)
    mask = rng.random((256, 3)) < 0.5
    mask[np.arange(256), rng.integers(0, 3, 256)] = True  # at least one legal action per row
    actions = policy.act(obs, mask)
    assert actions.dtype == np.int64 and actions.shape == (256,)
    assert mask[np.arange(256), actions].all()
    probs = policy.action_probs(obs, mask)
    assert probs.shape == (256, 3)
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    assert (probs[~mask] == 0.0).all()
    # Masking the unmasked favourite must change the choice.
    free = policy.act(obs, np.ones((256, 3), dtype=bool))
    forbid = np.ones((256, 3), dtype=bool)
    forbid[np.arange(256), free] = False
    assert (policy.act(obs, forbid) != free).all()
    with pytest.raises(ValueError, match="allow no action"):
        policy.act(obs[:2], np.zeros((2, 3), dtype=bool))
    with pytest.raises(ValueError, match=f"shape \\(B, {OBS_DIM}\\)"):
        policy.act(obs[:, :5], mask)


def test_tampered_policy_is_refused(run_dir: Path, tmp_path: Path) -> None:
    shutil.copy(run_dir / "policy.d3", tmp_path / "policy.d3")
    shutil.copy(run_dir / "manifest.json", tmp_path / "manifest.json")
    load_policy(tmp_path / "policy.d3")  # an intact copy loads
    data = bytearray((tmp_path / "policy.d3").read_bytes())
    data[len(data) // 2] ^= 0xFF
    (tmp_path / "policy.d3").write_bytes(bytes(data))
    with pytest.raises(PolicyLoadError, match="refusing to load .*sha256"):
        load_policy(tmp_path / "policy.d3")
    # A policy without its run's manifest is not unpickled either.
    (tmp_path / "manifest.json").unlink()
    with pytest.raises(PolicyLoadError, match="no manifest"):
        load_policy(tmp_path / "policy.d3")
    # Nor is one checked against another run's manifest.
    with pytest.raises(PolicyLoadError, match="sha256"):
        load_policy(run_dir / "policy.d3", run_dir / "baselines" / "cql" / "manifest.json")


def test_actor_module_equals_policy_logits(run_dir: Path) -> None:
    policy = load_policy(run_dir / "policy.d3")
    mlp = actor_logits_module(policy)
    assert [type(m).__name__ for m in mlp] == ["Linear", "ReLU", "Linear", "ReLU", "Linear"]
    assert mlp[0].in_features == OBS_DIM and mlp[-1].out_features == 3
    obs, _ = episode_observations(1, np.random.default_rng(3), noise=0.05)
    with torch.no_grad():
        logits = mlp(torch.from_numpy(obs)).numpy()
    np.testing.assert_allclose(logits, policy.scores(obs), rtol=1e-4, atol=1e-4)
    with pytest.raises(ValueError, match="iql or bc"):
        actor_logits_module(load_policy(run_dir / "baselines" / "cql" / "policy.d3"))


def test_warmup_respected(run_dir: Path) -> None:
    policy = load_policy(run_dir / "policy.d3")
    obs, _ = episode_observations(0, np.random.default_rng(0), noise=0.0)
    mask = stop_mask(np.arange(N_STEPS))
    assert (policy.act(obs, mask)[:WARMUP] == 0).all()
    assert policy.act(obs, mask)[-1] == 1  # the last step only allows stop


def test_empty_validation_and_bad_buffers(tmp_path: Path) -> None:
    from addiffusion.datasets.d3rlpy_convert import make_buffer as convert_buffer

    cfg = OfflineRLConfig(
        n_steps=10,
        n_steps_per_epoch=10,
        hidden_units=[4],
        iql={**DEFAULT.iql, "batch_size": 8},
    )
    empty_val = convert_buffer([], OBS_DIM, TABLE.n)  # e.g. datasets.val_fraction = 0
    metrics = train_offline(
        make_buffer(2, seed=0), empty_val, cfg, tmp_path / "a", actions=TABLE, log=False
    )
    assert metrics["val"] == {"stop": None} and metrics["train_stop"]["n_episodes"] == 2
    assert (tmp_path / "a" / "baselines").is_dir() and not (tmp_path / "a" / "logs").exists()
    # No validation trajectory: no FQE (the default fqe.n_steps is not 0), no ope.json.
    assert metrics["fqe"] is None and not (tmp_path / "a" / "ope.json").exists()
    assert (tmp_path / "a" / "seeds").is_dir() and not any((tmp_path / "a" / "seeds").iterdir())
    with pytest.raises(ValueError, match="train buffer has no episodes"):
        train_offline(empty_val, None, cfg, tmp_path / "b", actions=TABLE)


def test_ablations_are_recorded_and_need_the_layout(tmp_path: Path) -> None:
    """The action space reaches the manifest and the policy's mask; dropping observation parts
    without the dataset's layout is refused before anything is trained."""
    cfg = OfflineRLConfig(
        n_steps=10,
        n_steps_per_epoch=10,
        hidden_units=[4],
        device="cpu",
        action_space="stop_only",
        iql={**DEFAULT.iql, "batch_size": 8},
    )
    train_offline(make_buffer(2, seed=0), None, cfg, tmp_path / "a", actions=TABLE, log=False)
    manifest = json.loads((tmp_path / "a" / "manifest.json").read_text())
    assert manifest["allowed_actions"] == ["jump-1", "stop"]
    assert manifest["config"]["action_space"] == "stop_only"
    policy = load_policy(tmp_path / "a" / "policy.d3")
    obs = np.random.default_rng(0).normal(size=(32, OBS_DIM)).astype(np.float32)
    assert TABLE.refine not in policy.act(obs, np.ones((32, TABLE.n), dtype=bool)).tolist()

    dropped = OfflineRLConfig(**{**TINY, "drop_observations": ["quality"]})
    with pytest.raises(ValueError, match="drop_observations needs the dataset's observation"):
        train_offline(make_buffer(2, seed=0), None, dropped, tmp_path / "b", actions=TABLE)
    assert not (tmp_path / "b" / "policy.d3").exists()
