"""What one ``train_offline`` call writes besides the final policy: a trusted checkpoint after
every epoch but the last, the FQE of each (``ope.json``), a run per seed, a DiscreteBCQ baseline.
Tiny runs on the synthetic stop-MDP (``offline_rl_stop_mdp``)."""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch
from offline_rl_stop_mdp import OBS_DIM, TABLE, make_buffer

from addiffusion.offline_rl import trust
from addiffusion.offline_rl.config import FQEParams, OfflineRLConfig
from addiffusion.offline_rl.policy import load_policy
from addiffusion.offline_rl.train import train_offline

torch.set_num_threads(1)

DEFAULT = OfflineRLConfig()
FQE = FQEParams(n_steps=20, batch_size=16, target_update_interval=5)


def _tiny(**cfg: object) -> OfflineRLConfig:
    """Tiny nets and batches for every algorithm; ``cfg``: other OfflineRLConfig fields."""
    settings: dict[str, object] = {
        "n_steps": 30,
        "n_steps_per_epoch": 10,
        "hidden_units": [8],
        "device": "cpu",
        "fqe": FQEParams(n_steps=0),
        "iql": {**DEFAULT.iql, "batch_size": 16},
        "cql": {**DEFAULT.cql, "batch_size": 16, "target_update_interval": 10},
        "bc": {**DEFAULT.bc, "batch_size": 16},
        "bcq": {**DEFAULT.bcq, "batch_size": 16, "target_update_interval": 10},
        **cfg,
    }
    return OfflineRLConfig(**settings)  # type: ignore[arg-type]


def _weights(run: Path) -> dict[str, np.ndarray]:
    """Every tensor of the trained modules of ``run/policy.d3`` (policy, Q, V, targets)."""
    impl = load_policy(run / "policy.d3").algo.impl
    out = {}
    for name, module in sorted(impl.modules.__dict__.items()):
        if isinstance(module, torch.nn.Module):
            for key, value in module.state_dict().items():
                out[f"{name}.{key}"] = value.detach().cpu().numpy().copy()
    assert out
    return out


def _same(a: dict[str, np.ndarray], b: dict[str, np.ndarray]) -> bool:
    return a.keys() == b.keys() and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """30 steps, an epoch every 10: checkpoints at 10 and 20, policy.d3 at 30, FQE of each."""
    out = tmp_path_factory.mktemp("checkpoints") / "run"
    val = make_buffer(3, seed=1)  # 3 recorded 8-step trajectories (and one-step stops)
    train_offline(make_buffer(6, seed=0), val, _tiny(fqe=FQE), out, actions=TABLE, log=False)
    return out


def test_a_trusted_checkpoint_after_every_epoch_but_the_last(run: Path) -> None:
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["step"] == 30
    assert manifest["checkpoints"] == ["checkpoints/10", "checkpoints/20"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["10", "20"]
    shas = {manifest["sha256"]}
    for step in (10, 20):
        folder = run / "checkpoints" / str(step)
        ck = json.loads((folder / "manifest.json").read_text())
        sha = hashlib.sha256((folder / "policy.d3").read_bytes()).hexdigest()
        assert ck["sha256"] == sha and ck["step"] == step and ck["checkpoints"] == []
        assert ck["algo"] == "iql" and ck["seed"] == 0 and ck["config"] == manifest["config"]
        assert trust.read_store()[sha]["source"].startswith("offline-rl train (iql, seed 0)")
        policy = load_policy(folder / "policy.d3")  # its own manifest, beside it
        assert policy.manifest["step"] == step and policy.observation_dim == OBS_DIM
        shas.add(sha)
    assert len(shas) == 3  # the policy changed between epochs
    # A checkpoint's policy.d3 does not pass as the final one.
    with pytest.raises(Exception, match="sha256"):
        load_policy(run / "checkpoints" / "10" / "policy.d3", run / "manifest.json")


def test_fqe_of_every_checkpoint_and_the_final_policy(run: Path) -> None:
    report = json.loads((run / "ope.json").read_text())
    assert report["fit_on"] == "val" and report["algo"] == "iql" and report["seed"] == 0
    points = report["points"]
    assert [p["step"] for p in points] == [10, 20, 30]
    assert [p["path"] for p in points] == ["checkpoints/10", "checkpoints/20", "."]
    for p in points:
        assert math.isfinite(p["initial_value"]) and math.isfinite(p["average_value"])
        assert p["n_start_episodes"] == 3 and p["settings"]["n_steps"] == 20
        assert p["settings"]["gamma"] == 0.99 and p["settings"]["hidden_units"] == [8]
    assert math.isfinite(report["behaviour_return"])
    # The final policy's FQE is in metrics.json (and the manifest's metrics).
    metrics = json.loads((run / "metrics.json").read_text())
    assert metrics["fqe"] == points[-1]
    assert json.loads((run / "manifest.json").read_text())["metrics"]["fqe"] == points[-1]


def test_a_rerun_replaces_checkpoints_and_ope(run: Path, tmp_path: Path) -> None:
    """Training again into a folder leaves nothing of the earlier run: one epoch has no
    checkpoint, and fqe.n_steps = 0 writes no ope.json."""
    import shutil

    out = Path(shutil.copytree(run, tmp_path / "run"))
    cfg = _tiny(n_steps=10, n_steps_per_epoch=10)
    metrics = train_offline(make_buffer(6, seed=0), make_buffer(3, seed=1), cfg, out, actions=TABLE)
    assert metrics["fqe"] is None and not (out / "ope.json").exists()
    assert (out / "checkpoints").is_dir() and not any((out / "checkpoints").iterdir())
    assert json.loads((out / "manifest.json").read_text())["checkpoints"] == []


def test_one_run_per_seed(tmp_path: Path) -> None:
    """seeds [0, 3]: seed 0 in out/, seed 3 in out/seeds/3/, each with its baselines; a seed
    gives the same weights as a run of that seed alone, another seed other weights."""
    data = make_buffer(6, seed=0)
    out = tmp_path / "out"
    cfg = _tiny(n_steps=20, seeds=[0, 3], baselines=["bc"])
    metrics = train_offline(data, None, cfg, out, actions=TABLE, log=False)
    assert metrics["seed"] == 0 and set(metrics["seeds"]) == {"3"}
    assert metrics["seeds"]["3"]["seed"] == 3 and "bc" in metrics["seeds"]["3"]["baselines"]
    assert json.loads((out / "metrics.json").read_text())["seeds"]["3"]["seed"] == 3
    three = out / "seeds" / "3"
    assert sorted(p.name for p in (out / "seeds").iterdir()) == ["3"]
    for run, seed in ((out, 0), (three, 3)):
        for sub in (run, run / "baselines" / "bc"):
            manifest = json.loads((sub / "manifest.json").read_text())
            assert manifest["seed"] == seed and manifest["config"]["seeds"] == [seed]
            assert manifest["checkpoints"] == ["checkpoints/10"]
            assert load_policy(sub / "policy.d3").manifest["seed"] == seed
        assert not (run / "seeds" / "0").exists()

    alone = tmp_path / "alone"
    train_offline(data, None, cfg.with_seed(3), alone, actions=TABLE, log=False)
    assert _same(_weights(alone), _weights(three))
    assert _same(_weights(alone / "baselines" / "bc"), _weights(three / "baselines" / "bc"))
    assert not _same(_weights(out), _weights(three))  # the seed matters
    # A run of the same seed again: the same weights.
    again = tmp_path / "again"
    train_offline(data, None, cfg.with_seed(0), again, actions=TABLE, log=False)
    assert _same(_weights(again), _weights(out))


def test_bcq_trains_as_a_baseline_and_loads(tmp_path: Path) -> None:
    out = tmp_path / "out"
    cfg = _tiny(n_steps=20, baselines=["bcq"], fqe=FQE)
    metrics = train_offline(
        make_buffer(6, seed=0), make_buffer(3, seed=1), cfg, out, actions=TABLE, log=True
    )
    bcq = metrics["baselines"]["bcq"]
    assert bcq["algo"] == "bcq" and math.isfinite(bcq["val"]["td_error"])  # it has a Q function
    assert math.isfinite(bcq["fqe"]["initial_value"])
    run = out / "baselines" / "bcq"
    assert (run / "logs" / "bcq").is_dir() and (run / "checkpoints" / "10").is_dir()
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["d3rlpy_type"] == "discrete_bcq"
    assert manifest["config"]["bcq"]["action_flexibility"] == DEFAULT.bcq["action_flexibility"]
    policy = load_policy(run / "policy.d3")
    assert policy.algo_name == "bcq" and type(policy.algo).__name__ == "DiscreteBCQ"
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(64, OBS_DIM)).astype(np.float32)
    mask = rng.random((64, TABLE.n)) < 0.5
    mask[np.arange(64), rng.integers(0, TABLE.n, 64)] = True
    actions = policy.act(obs, mask)
    assert mask[np.arange(64), actions].all()
    assert load_policy(run / "checkpoints" / "10" / "policy.d3").algo_name == "bcq"


def test_bcq_as_the_main_algorithm(tmp_path: Path) -> None:
    cfg = _tiny(algo="bcq", n_steps=10)
    metrics = train_offline(make_buffer(4, seed=0), None, cfg, tmp_path, actions=TABLE, log=False)
    assert metrics["algo"] == "bcq" and np.isfinite(metrics["losses"]["loss"])
    assert load_policy(tmp_path / "policy.d3").algo_name == "bcq"
