"""Packages of online-finetune actors: the ablation PPO trained under (``allowed_actions``,
``observation_drop`` in the actor's manifest) goes into the package, which acts like the
fine-tuned policy; and ``ppo-scratch`` (``<online>/scratch``) is packaged like ``ppo``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from policy_packages import table_of, write_dataset_info

from addiffusion.cli import main
from addiffusion.diffusion.mdp import ObservationLayout
from addiffusion.diffusion.sampler import SamplerSettings
from addiffusion.online_finetune.ablation import Ablation
from addiffusion.online_finetune.actor import ActorSpec, MlpActor
from addiffusion.online_finetune.ppo import load_finetuned_policy, save_actor
from addiffusion.policy import AdaptivePolicy, PolicyPackageError, export_policy
from addiffusion.policy.export import METHODS, ONLINE_RUNS, package_finetuned
from addiffusion.task import read_task

torch.set_num_threads(1)
SETTINGS = SamplerSettings(n_max=6, strides=(1, 2, 4), refine_budget=1, height=32, width=32)
TABLE = table_of(SETTINGS)
"""jump-1, jump-2, jump-4, stop, refine."""
LAYOUT = ObservationLayout(16, 16)
ALLOWED = ("jump-1", "jump-2", "stop")
RESTRICTED = Ablation(allowed_actions=ALLOWED, observation_drop=("quality",), observation=LAYOUT)


def _obs(n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, LAYOUT.dim)) * 3 + 1).astype(np.float32)


def _masks(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return TABLE.mask(rng.integers(0, SETTINGS.n_max, n), rng.integers(0, 2, n), 1)


def _actor(seed: int, standardize: bool = True) -> MlpActor:
    """Random weights, scaled up so that the features (the quality ones too) decide."""
    torch.manual_seed(seed)
    actor = MlpActor(ActorSpec(LAYOUT.dim, (16,), TABLE.n, standardize=standardize))
    with torch.no_grad():
        for p in actor.parameters():
            p.mul_(6.0)
        if standardize:
            actor.standardize.mean.normal_()
            actor.standardize.std.uniform_(0.5, 2.0)
    return actor


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The meta/info.json of a built dataset with that table and layout."""
    return write_dataset_info(tmp_path_factory.mktemp("dataset"), SETTINGS, LAYOUT, ["clip_score"])


@pytest.fixture(scope="module")
def online(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An online-finetune run's layout: the actor from the offline init and, in ``scratch/``,
    the one from scratch, both trained under RESTRICTED (as finetune writes them)."""
    root = tmp_path_factory.mktemp("online")
    for folder, init, seed in ((root, "offline", 0), (root / "scratch", "scratch", 1)):
        extra = {"init": init, "offline_algo": "iql", "seed": 0}
        save_actor(_actor(seed), TABLE, folder, extra, ablation=RESTRICTED)
    return root


def test_online_runs_match_the_finetune_layout() -> None:
    from addiffusion.online_finetune.finetune import SCRATCH_DIR

    assert ONLINE_RUNS == {"ppo": ".", "ppo-scratch": SCRATCH_DIR}
    assert set(METHODS) == {"iql", "cql", "bc", "bcq", "ppo", "ppo-scratch"}


@pytest.mark.parametrize("run", [".", "scratch"])
def test_package_carries_the_ablation_and_acts_like_the_finetuned_policy(
    online: Path, dataset: Path, tmp_path: Path, run: str
) -> None:
    ppo = load_finetuned_policy(online / run)
    assert ppo.allowed is not None and ppo.keep is not None  # the fixture restricts both
    package = package_finetuned(online / run, read_task(dataset))
    cfg = package.config
    assert cfg.algo == "ppo" and cfg.allowed_actions == ALLOWED
    assert cfg.observation_drop == ("quality",)
    assert cfg.training["init"] == ("offline" if run == "." else "scratch")
    obs, mask = _obs(600, 2), _masks(600, 3)
    ours = package.act(obs, mask)
    np.testing.assert_array_equal(ours, ppo.act(obs, mask))
    # Restricted and legal: only the allowed actions where the mask leaves one of them.
    assert mask[np.arange(len(ours)), ours].all()
    restricted = (mask & package.allowed).any(axis=1)
    assert restricted.all() and package.allowed[ours].all()
    # The restriction matters: unrestricted, the actor would take refine or jump-4 somewhere.
    free = np.where(mask, ppo.logits(obs), -np.inf).argmax(axis=1)
    assert (~package.allowed[free]).any()
    # The quality columns do not matter, to the package nor to its network alone.
    moved = obs.copy()
    moved[:, ~LAYOUT.keep_mask(("quality",))] = 100.0
    np.testing.assert_array_equal(package.act(moved, mask), ours)
    with torch.no_grad():
        a = package.networks[0](torch.from_numpy(obs)).numpy()
        b = package.networks[0](torch.from_numpy(moved)).numpy()
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-4)
    # The restrictions survive save / load.
    package.save_pretrained(tmp_path / "pkg")
    saved = json.loads((tmp_path / "pkg" / "config.json").read_text())
    assert saved["allowed_actions"] == list(ALLOWED) and saved["observation_drop"] == ["quality"]
    loaded = AdaptivePolicy.from_pretrained(tmp_path / "pkg")
    np.testing.assert_array_equal(loaded.act(obs, mask), ours)


def test_unrestricted_actor_packages_without_ablation_keys(dataset: Path, tmp_path: Path) -> None:
    save_actor(_actor(3, standardize=False), TABLE, tmp_path / "online")
    package = package_finetuned(tmp_path / "online", read_task(dataset))
    assert package.config.allowed_actions is None and package.config.observation_drop == ()
    assert "init" not in package.config.training  # the manifest does not say
    package.save_pretrained(tmp_path / "pkg")
    saved = json.loads((tmp_path / "pkg" / "config.json").read_text())
    assert "allowed_actions" not in saved and "observation_drop" not in saved
    ppo = load_finetuned_policy(tmp_path / "online")
    obs, mask = _obs(300, 4), _masks(300, 5)
    np.testing.assert_array_equal(package.act(obs, mask), ppo.act(obs, mask))
    # Every action allowed, listed or not: the same package.
    every = Ablation(allowed_actions=tuple(TABLE.names), observation=LAYOUT)
    save_actor(_actor(3, standardize=False), TABLE, tmp_path / "all", ablation=every)
    assert package_finetuned(tmp_path / "all", read_task(dataset)).config.allowed_actions is None


def test_package_refuses_an_actor_of_another_observation_layout(
    dataset: Path, tmp_path: Path
) -> None:
    other = ObservationLayout(8, 24)  # the same dim, other columns
    assert other.dim == LAYOUT.dim
    ablation = Ablation(observation_drop=("quality",), observation=other)
    save_actor(_actor(0), TABLE, tmp_path / "online", ablation=ablation)
    with pytest.raises(PolicyPackageError, match="records the observation layout"):
        package_finetuned(tmp_path / "online", read_task(dataset))


def test_export_ppo_scratch_packages_the_scratch_actor(
    online: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    scratch = load_finetuned_policy(online / "scratch")
    obs, mask = _obs(400, 6), _masks(400, 7)
    method, package = export_policy(
        dataset, tmp_path / "pkg", online_dir=online, method="ppo-scratch"
    )
    assert method == "ppo-scratch" and package.config.algo == "ppo"
    assert package.config.training["init"] == "scratch"
    np.testing.assert_array_equal(package.act(obs, mask), scratch.act(obs, mask))
    # ... not the fine-tuned one (other weights).
    _, finetuned = export_policy(dataset, tmp_path / "ppo", online_dir=online, method="ppo")
    assert finetuned.config.training["init"] == "offline"
    assert not np.array_equal(finetuned.scores(obs), package.scores(obs))
    # The eval's best learned method may be ppo-scratch: export picks it, with its numbers.
    metrics = {
        "ppo": {"kind": "policy", "nfe": 3.0, "verifier": 0.3, "frontier": {"gain": -0.01}},
        "ppo-scratch": {"kind": "policy", "nfe": 2.5, "verifier": 0.4, "frontier": {"gain": 0.02}},
        "learned": {"seeds": {}, "pairs": {}},
        "frontier": {"method": "ppo-scratch", "metric": "verifier", "line": "frontier: ..."},
    }
    (tmp_path / "eval").mkdir()
    (tmp_path / "eval" / "metrics.json").write_text(json.dumps(metrics))
    out = tmp_path / "best"
    argv = ["policy", "export", "--dataset", str(dataset), "--online", str(online)]
    assert main([*argv, "--eval", str(tmp_path / "eval"), "--out", str(out)]) == 0
    assert "wrote the ppo-scratch policy (eval: NFE 2.50" in capsys.readouterr().out
    best = AdaptivePolicy.from_pretrained(out)
    assert best.config.evaluation["nfe"] == 2.5 and best.config.training["init"] == "scratch"
    np.testing.assert_array_equal(best.act(obs, mask), scratch.act(obs, mask))
    # --method accepts it on the command line too.
    assert main([*argv, "--method", "ppo-scratch", "--out", str(tmp_path / "cli")]) == 0
    capsys.readouterr()


def test_export_ppo_scratch_errors_name_what_is_missing(
    online: Path, dataset: Path, tmp_path: Path
) -> None:
    with pytest.raises(PolicyPackageError, match="method ppo-scratch needs --online"):
        export_policy(dataset, tmp_path / "a", method="ppo-scratch")
    save_actor(_actor(0), TABLE, tmp_path / "no-scratch")
    with pytest.raises(PolicyPackageError, match="PPO from scratch .*online_finetune.from_scratch"):
        export_policy(
            dataset, tmp_path / "b", online_dir=tmp_path / "no-scratch", method="ppo-scratch"
        )
    assert not (tmp_path / "b").exists()
