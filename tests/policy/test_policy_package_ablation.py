"""Packages of BCQ policies and of ablation runs (``allowed_actions``, ``observation_drop`` in
the offline run's manifest): they act like the trained policy, keep their restrictions through
save / load, and malformed configs are refused by name. The runs are trained with d3rlpy
directly (a few steps on random data), their manifests written as offline-rl train writes them."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import shutil
from pathlib import Path
from typing import Any

import d3rlpy
import numpy as np
import pytest
import torch
from d3rlpy.algos import DiscreteBCQConfig
from d3rlpy.constants import ActionSpace
from d3rlpy.dataset import MDPDataset
from d3rlpy.logging import NoopAdapterFactory
from d3rlpy.models.encoders import VectorEncoderFactory
from d3rlpy.preprocessing import StandardObservationScaler
from policy_packages import SHAPES, random_package, table_of, write_dataset_info

from addiffusion.cli import main
from addiffusion.diffusion.mdp import ObservationLayout, drop_parts
from addiffusion.diffusion.sampler import SamplerSettings
from addiffusion.offline_rl import trust
from addiffusion.offline_rl.discrete_iql import DiscreteIQLConfig
from addiffusion.offline_rl.policy import D3RLPY_TYPES, MANIFEST_FORMAT, load_policy
from addiffusion.policy import AdaptivePolicy, PolicyPackageError, export_policy
from addiffusion.policy.export import package_offline
from addiffusion.policy.package import PolicyConfig
from addiffusion.task import read_task

torch.set_num_threads(1)
SETTINGS = SamplerSettings(n_max=6, strides=(1, 2, 4), refine_budget=1, height=32, width=32)
TABLE = table_of(SETTINGS)
"""jump-1, jump-2, jump-4, stop, refine."""
LAYOUT = ObservationLayout(16, 16)
FLEX = 0.3
BCQ_ALLOWED = ["jump-1", "jump-2", "stop"]


def _obs(n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, LAYOUT.dim)) * 3 + 1).astype(np.float32)


def _masks(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return TABLE.mask(rng.integers(0, SETTINGS.n_max, n), rng.integers(0, 2, n), 1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The meta/info.json of a built dataset with that table and layout."""
    return write_dataset_info(tmp_path_factory.mktemp("dataset"), SETTINGS, LAYOUT, ["clip_score"])


def _train(algo: str, folder: Path, drop: list[str], allowed: list[str] | None) -> None:
    """Train ``algo`` on random data without ``drop`` and write a trusted run to ``folder``."""
    n = 300
    rng = np.random.default_rng(0)
    obs = drop_parts(_obs(n, 0), LAYOUT, drop)
    buffer = MDPDataset(
        observations=obs,
        actions=rng.integers(0, TABLE.n, n),
        rewards=rng.normal(size=(n, 1)).astype(np.float32),
        terminals=(np.arange(n) % 5 == 4).astype(np.float32),
        action_space=ActionSpace.DISCRETE,
        action_size=TABLE.n,
    )
    cls: Any = DiscreteBCQConfig if algo == "bcq" else DiscreteIQLConfig
    encoders = {
        f.name: VectorEncoderFactory([16, 16])
        for f in dataclasses.fields(cls)
        if f.name.endswith("encoder_factory")
    }
    extra = {"action_flexibility": FLEX} if algo == "bcq" else {}
    scaler = StandardObservationScaler(mean=obs.mean(0), std=obs.std(0))
    d3rlpy.seed(0)
    model = cls(batch_size=32, n_critics=2, observation_scaler=scaler, **encoders, **extra).create(
        device="cpu:0"
    )
    model.fit(
        buffer,
        n_steps=20,
        n_steps_per_epoch=20,
        logger_adapter=NoopAdapterFactory(),
        show_progress=False,
    )
    if algo == "bcq":
        with torch.no_grad():  # a confident imitator: its filter matters
            model.impl.modules.imitator._fc.weight.mul_(6.0)
    folder.mkdir(parents=True, exist_ok=True)
    model.save(str(folder / "policy.d3"))
    sha256 = hashlib.sha256((folder / "policy.d3").read_bytes()).hexdigest()
    trust.record(folder / "policy.d3", sha256, "test")
    manifest = {
        "format": MANIFEST_FORMAT,
        "algo": algo,
        "d3rlpy_type": D3RLPY_TYPES[algo],
        "sha256": sha256,
        "observation_dim": LAYOUT.dim,
        "observation": LAYOUT.to_dict(),
        "observation_drop": drop,
        "action_size": TABLE.n,
        "actions": TABLE.to_dict(),
        "allowed_actions": allowed,
        "config": {"algo": algo, "baselines": ["iql"] if algo == "bcq" else []},
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An offline-rl output folder: BCQ (main; without quality, restricted actions) and an IQL
    baseline (without image features; every action allowed, listed as train lists them)."""
    root = tmp_path_factory.mktemp("offline")
    _train("bcq", root, ["quality"], BCQ_ALLOWED)
    _train("iql", root / "baselines" / "iql", ["image_features"], list(TABLE.names))
    return root


def test_bcq_package_acts_like_the_policy(offline: Path, dataset: Path, tmp_path: Path) -> None:
    policy = load_policy(offline / "policy.d3")
    package = package_offline(offline, read_task(dataset))
    cfg = package.config
    assert (cfg.algo, cfg.combine, cfg.action_flexibility) == ("bcq", "bcq", pytest.approx(FLEX))
    assert len(package.networks) == 3  # the imitator and the twin Q functions
    assert cfg.allowed_actions == tuple(BCQ_ALLOWED) and cfg.observation_drop == ("quality",)
    obs, mask = _obs(1000, 1), _masks(1000, 2)
    obs[:, LAYOUT.columns("quality")] = 40.0 * np.random.default_rng(3).random((1000, 5))
    actions = package.act(obs, mask)
    np.testing.assert_array_equal(actions, policy.act(obs, mask))
    assert package.allowed[actions].all()
    # The imitator's filter and the restriction both decide: the best mean Q is often not taken.
    _, q = policy.bcq_parts(obs)
    assert (np.where(mask, q, -np.inf).argmax(axis=1) != actions).sum() >= 5

    package.save_pretrained(tmp_path / "pkg")
    saved = json.loads((tmp_path / "pkg" / "config.json").read_text())
    assert saved["combine"] == "bcq" and saved["action_flexibility"] == pytest.approx(FLEX)
    assert saved["allowed_actions"] == BCQ_ALLOWED and saved["observation_drop"] == ["quality"]
    loaded = AdaptivePolicy.from_pretrained(tmp_path / "pkg")
    assert loaded.config == cfg
    np.testing.assert_array_equal(loaded.act(obs, mask), actions)
    card = (tmp_path / "pkg" / "README.md").read_text()
    assert "Batch-Constrained" in card and "an imitator and 2 Q function(s)" in card
    assert "only takes `jump-1`, `jump-2`, `stop`" in card and "`quality`" in card


def test_a_dropped_part_is_ignored_by_every_network(offline: Path, dataset: Path) -> None:
    policy = load_policy(offline / "baselines" / "iql" / "policy.d3")
    package = package_offline(offline, read_task(dataset), "iql")
    assert package.config.allowed_actions is None  # every action listed: no restriction
    assert package.config.observation_drop == ("image_features",)
    obs, mask = _obs(500, 4), _masks(500, 5)
    other = obs.copy()
    other[:, LAYOUT.columns("image_features")] = np.random.default_rng(6).normal(size=(500, 16))
    np.testing.assert_array_equal(package.act(other, mask), policy.act(obs, mask))
    with torch.no_grad():  # the networks alone, without the package's own zeroing
        for net in package.networks:
            np.testing.assert_allclose(
                net(torch.from_numpy(other)).numpy(),
                net(torch.from_numpy(obs)).numpy(),
                rtol=1e-5,
                atol=1e-5,
            )


def test_export_policy_bcq_and_its_cli(
    offline: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    method, package = export_policy(dataset, tmp_path / "policy", offline, method="bcq")
    assert method == "bcq" and package.config.combine == "bcq"
    assert AdaptivePolicy.from_pretrained(tmp_path / "policy").config == package.config
    # The eval's best learned policy may be BCQ.
    (tmp_path / "eval").mkdir()
    metrics = {
        "bcq": {"kind": "policy", "nfe": 2.5, "verifier": 0.5},
        "frontier": {"method": "bcq", "metric": "verifier", "line": "frontier: method=bcq"},
    }
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(metrics))
    args = ["policy", "export", "--dataset", str(dataset), "--offline", str(offline)]
    assert main([*args, "--eval", str(tmp_path / "eval"), "--out", str(tmp_path / "best")]) == 0
    assert "wrote the bcq policy" in capsys.readouterr().out
    assert main([*args, "--method", "bcq", "--out", str(tmp_path / "named")]) == 0


def test_a_run_on_another_layout_is_refused(offline: Path, dataset: Path, tmp_path: Path) -> None:
    run = tmp_path / "offline"
    shutil.copytree(offline, run)
    manifest = json.loads((run / "manifest.json").read_text())
    manifest["observation"] = ObservationLayout(8, 24).to_dict()  # same dim, other columns
    (run / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(PolicyPackageError, match="records the observation layout"):
        package_offline(run, read_task(dataset))


def test_allowed_actions_restrict_a_package() -> None:
    table = table_of(SHAPES)
    package = random_package(allowed_actions=("stop", "jump-1"))
    assert package.config.allowed_actions == ("stop", "jump-1")
    np.testing.assert_array_equal(package.allowed, [n in ("jump-1", "stop") for n in table.names])
    obs = np.random.default_rng(0).normal(size=(300, package.obs_dim)).astype(np.float32)
    mask = table.mask(np.arange(300) % 15, np.zeros(300, np.int64), 1)
    scores = package.scores(obs)
    assert (~package.allowed[np.where(mask, scores, -np.inf).argmax(axis=1)]).any()
    actions = package.act(obs, mask)
    assert package.allowed[actions].all() and mask[np.arange(300), actions].all()
    # A row whose legal actions are all disallowed keeps its own mask.
    only_refine = np.zeros_like(mask)
    only_refine[:, table.refine] = True
    assert (package.act(obs, only_refine) == table.refine).all()


def test_dropped_parts_are_zeroed_by_a_package() -> None:
    package = random_package(observation_drop=("text_features", "time"))
    layout = package.config.observation
    obs = np.random.default_rng(0).normal(size=(64, package.obs_dim)).astype(np.float32)
    other = obs.copy()
    other[:, ~layout.keep_mask(["text_features", "time"])] = 7.0
    np.testing.assert_array_equal(package.scores(other), package.scores(obs))
    assert not np.array_equal(random_package().scores(other), random_package().scores(obs))


def test_old_configs_load_and_defaults_are_not_written() -> None:
    cfg = random_package().config.to_dict()
    for key in ("combine", "action_flexibility", "allowed_actions", "observation_drop"):
        assert key not in cfg  # as packages written before these keys existed
    old = PolicyConfig.from_dict(cfg)
    assert (old.combine, old.action_flexibility) == ("mean", None)
    assert (old.allowed_actions, old.observation_drop) == (None, ())
    explicit = {
        **cfg,
        "combine": "mean",
        "action_flexibility": None,
        "allowed_actions": None,
        "observation_drop": [],
    }
    assert PolicyConfig.from_dict(explicit) == old


@pytest.mark.parametrize(
    ("change", "match"),
    [
        ({"combine": "median"}, "combine must be one of mean, bcq, got 'median'"),
        ({"combine": "bcq", "action_flexibility": 0.3}, "algo 'iql' needs combine 'mean'"),
        ({"algo": "bcq"}, "algo 'bcq' needs combine 'bcq'"),
        ({"algo": "bcq", "combine": "bcq"}, "combine 'bcq' needs action_flexibility"),
        (
            {"algo": "bcq", "combine": "bcq", "action_flexibility": 0.0},
            "combine 'bcq' needs action_flexibility, a number > 0, got 0.0",
        ),
        ({"action_flexibility": 0.3}, "action_flexibility is BCQ's"),
        ({"action_flexibility": "0.3"}, "action_flexibility must be a number or null"),
        ({"combine": 1}, "combine must be a string"),
        ({"allowed_actions": ["jump-1", "jump-3"]}, "allowed_actions: unknown action 'jump-3'"),
        ({"allowed_actions": []}, "allowed_actions must be distinct action names"),
        ({"allowed_actions": ["stop", "stop"]}, "allowed_actions must be distinct action names"),
        ({"allowed_actions": "stop"}, "allowed_actions must be a list of names"),
        ({"observation_drop": ["colour"]}, "observation_drop: unknown observation part 'colour'"),
        ({"observation_drop": ["time", "time"]}, "observation_drop names a part twice"),
        ({"observation_drop": None}, "observation_drop must be a list of names"),
    ],
)
def test_malformed_configs_are_refused_by_name(change: dict[str, Any], match: str) -> None:
    cfg = random_package().config.to_dict()
    with pytest.raises(PolicyPackageError, match=match):
        PolicyConfig.from_dict({**cfg, **change})


def test_a_bcq_package_needs_an_imitator_and_a_q_function() -> None:
    with pytest.raises(PolicyPackageError, match=r"networks \[imitator, q_1, ...\]"):
        random_package(algo="bcq", combine="bcq", action_flexibility=0.3)
    package = random_package(algo="bcq", combine="bcq", action_flexibility=0.3, networks=3)
    obs = np.random.default_rng(0).normal(size=(64, package.obs_dim)).astype(np.float32)
    with torch.no_grad():
        x = torch.from_numpy(obs)
        log_probs = torch.log_softmax(package.networks[0](x), dim=1)
        q = (package.networks[1](x) + package.networks[2](x)) / 2
    kept = (log_probs - log_probs.max(dim=1, keepdim=True).values > np.log(0.3)).numpy()
    expected = np.where(kept, q.numpy(), -np.inf).argmax(axis=1)
    np.testing.assert_array_equal(package.act(obs, np.ones_like(kept)), expected)


def test_a_package_that_would_act_differently_is_refused(
    offline: Path, dataset: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import addiffusion.policy.export as export

    task = read_task(dataset)
    networks = export.offline_networks

    def bad_imitator(policy: Any) -> list[Any]:
        nets = networks(policy)
        with torch.no_grad():
            nets[0].head.bias[0] += 1.0
        return nets

    monkeypatch.setattr(export, "offline_networks", bad_imitator)
    with pytest.raises(PolicyPackageError, match=r"differs from it \(imitator\)"):
        package_offline(offline, task)
    monkeypatch.setattr(export, "offline_networks", networks)
    # Networks that still read the dropped columns (the package's scores zero them, but a
    # network copied alone would not).
    monkeypatch.setattr(export, "_ignore_columns", lambda net, drop: None)
    with pytest.raises(PolicyPackageError, match=r"\(network 0, dropped columns\)"):
        package_offline(offline, task, "iql")
