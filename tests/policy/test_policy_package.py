"""Policy packages: save / load round trips, the Hub mixin, export from trained IQL / CQL / BC /
BCQ / PPO runs with identical actions, the model card, and d3rlpy registration on `import
addiffusion`."""

from __future__ import annotations

import dataclasses
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from d3rlpy.constants import ActionSpace
from d3rlpy.dataset import MDPDataset
from policy_packages import SHAPES, random_package, table_of

import addiffusion.policy.package as package_module
from addiffusion.cli import main
from addiffusion.diffusion.sampler import SamplerSettings
from addiffusion.offline_rl.config import ALGORITHMS, FQEParams, OfflineRLConfig
from addiffusion.offline_rl.policy import load_policy
from addiffusion.offline_rl.train import train_offline
from addiffusion.online_finetune.actor import ActorSpec, MlpActor
from addiffusion.online_finetune.ppo import load_finetuned_policy, save_actor
from addiffusion.policy import AdaptivePolicy, PolicyPackageError, export_policy
from addiffusion.task import read_task

SETTINGS = SamplerSettings(n_max=6, strides=(1, 2, 4), refine_budget=1, height=32, width=32)
TABLE = table_of(SETTINGS)
DIM = 16 + 16 + 16 + 5  # image, text features, time embedding, quality


def _obs(n: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).normal(size=(n, DIM)).astype(np.float32)


def _masks(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return TABLE.mask(rng.integers(0, SETTINGS.n_max, n), rng.integers(0, 2, n), 1)


@pytest.fixture(scope="module")
def dataset(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The meta/info.json of a built dataset with that table and layout."""
    root = tmp_path_factory.mktemp("dataset")
    (root / "meta").mkdir()
    info = {
        "backbone": "org/tiny-sd",
        "scheduler": "ddim",
        "scorer": "ViT-B-32@laion2b_s34b_b79k",
        "family": "sd",
        "components": ["clip_score", "stability", "verifier"],
        "sampler": dataclasses.asdict(SETTINGS),
        "actions": TABLE.to_dict(),
        "component_stats": {"clip_score": {"mean": 0.1, "std": 0.2}},
        "observation": {"image_dim": 16, "text_dim": 16, "time_dim": 16, "quality_dim": 5},
        "counts": {"episodes": 120, "root_episodes": 100, "steps": 700},
        "behavior_policy": {"description": "constant strides and random jumps"},
    }
    (root / "meta" / "info.json").write_text(json.dumps(info))
    return root


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An offline-rl run (iql + cql, bc baselines) and an online-finetune actor on random data."""
    root = tmp_path_factory.mktemp("runs")
    n = 400
    rng = np.random.default_rng(0)
    buffer = MDPDataset(
        observations=_obs(n, 0) * 3 + 1,
        actions=rng.integers(0, TABLE.n, n),
        rewards=rng.normal(size=(n, 1)).astype(np.float32),
        terminals=(np.arange(n) % 5 == 4).astype(np.float32),
        action_space=ActionSpace.DISCRETE,
        action_size=TABLE.n,
    )
    base = OfflineRLConfig()
    cfg = OfflineRLConfig(
        algo="iql",
        baselines=["cql", "bc", "bcq"],
        n_steps=20,
        n_steps_per_epoch=20,
        hidden_units=[16, 16],
        device="cpu",
        fqe=FQEParams(n_steps=0),
        **{name: {**base.settings(name), "batch_size": 32} for name in ALGORITHMS},
    )
    train_offline(buffer, None, cfg, root / "offline", actions=TABLE, log=False)
    torch.manual_seed(0)
    actor = MlpActor(ActorSpec(DIM, (16,), TABLE.n, standardize=True))
    with torch.no_grad():
        actor.standardize.mean.normal_()
        actor.standardize.std.uniform_(0.5, 2.0)
    save_actor(actor, TABLE, root / "online")
    metrics = {
        "ddim-4": {"kind": "baseline", "nfe": 4.0},
        "iql": {
            "kind": "policy",
            "nfe": 3.1,
            "verifier": 0.4,
            "frontier": {"gain": -0.05, "ci": [-0.1, 0.0]},
        },
        "cql": {
            "kind": "policy",
            "nfe": 2.5,
            "verifier": 0.45,
            "frontier": {"gain": 0.02, "ci": [-0.01, 0.05]},
        },
        "frontier": {
            "method": "cql",
            "metric": "verifier",
            "line": "frontier: method=cql gain=+0.020",
        },
    }
    (root / "eval").mkdir()
    (root / "eval" / "metrics.json").write_text(json.dumps(metrics))
    return root


def test_save_and_load_round_trip(tmp_path: Path) -> None:
    policy = random_package(networks=2, algo="cql")
    policy.save_pretrained(tmp_path / "pkg")
    assert sorted(p.name for p in (tmp_path / "pkg").iterdir()) == [
        "README.md",
        "config.json",
        "model.safetensors",
    ]
    loaded = AdaptivePolicy.from_pretrained(tmp_path / "pkg")
    assert loaded.config == policy.config
    obs = np.random.default_rng(0).normal(size=(64, policy.obs_dim)).astype(np.float32)
    mask = table_of(SHAPES).mask(np.arange(64) % 16, np.zeros(64, np.int64), 1)
    np.testing.assert_array_equal(loaded.act(obs, mask), policy.act(obs, mask))
    assert mask[np.arange(64), loaded.act(obs, mask)].all()  # always legal
    # weights that do not fit the config are refused with both named
    cfg = json.loads((tmp_path / "pkg" / "config.json").read_text())
    cfg["networks"] = cfg["networks"][:1]
    (tmp_path / "pkg" / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(PolicyPackageError, match="does not match config.json's networks"):
        AdaptivePolicy.from_pretrained(tmp_path / "pkg")
    with pytest.raises(PolicyPackageError, match="has no config.json"):
        AdaptivePolicy.from_pretrained(tmp_path)


def test_push_to_hub_and_load_by_repo_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """push_to_hub uploads what save_pretrained writes; from_pretrained("org/name") downloads
    config.json and model.safetensors through hf_hub_download (the Hub is faked here)."""
    hub = tmp_path / "hub"

    class FakeApi:
        def __init__(self, token: object = None) -> None:
            pass

        def create_repo(self, repo_id: str, **kwargs: object) -> object:
            return type("Url", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id: str, folder_path: Path, **kwargs: object) -> str:
            import shutil

            shutil.copytree(folder_path, hub / repo_id)
            return f"https://huggingface.co/{repo_id}/commit/0"

    def fake_download(repo_id: str, filename: str, **kwargs: object) -> str:
        return str(hub / repo_id / filename)

    import huggingface_hub.hub_mixin as mixin

    monkeypatch.setattr(mixin, "HfApi", FakeApi)
    monkeypatch.setattr(mixin, "hf_hub_download", fake_download)
    monkeypatch.setattr(package_module, "hf_hub_download", fake_download)
    policy = random_package()
    assert policy.push_to_hub("org/shapes-policy").endswith("/commit/0")
    assert (
        "# addiffusion schedule policy (iql)" in (hub / "org/shapes-policy/README.md").read_text()
    )
    loaded = AdaptivePolicy.from_pretrained("org/shapes-policy")
    obs = np.random.default_rng(1).normal(size=(8, policy.obs_dim)).astype(np.float32)
    np.testing.assert_array_equal(loaded.scores(obs), policy.scores(obs))


@pytest.mark.parametrize("algo", ["iql", "cql", "bc", "bcq", "ppo"])
def test_export_acts_like_the_trained_policy(runs: Path, dataset: Path, algo: str) -> None:
    task = read_task(dataset)
    obs, mask = _obs(500, 2) * 3 + 1, _masks(500, 3)
    if algo == "ppo":
        theirs = load_finetuned_policy(runs / "online")
        from addiffusion.policy.export import package_finetuned

        package = package_finetuned(runs / "online", task)
    else:
        sub = runs / "offline" if algo == "iql" else runs / "offline" / "baselines" / algo
        theirs = load_policy(sub / "policy.d3")
        from addiffusion.policy.export import package_offline

        package = package_offline(runs / "offline", task, algo)
    assert package.config.algo == algo
    # CQL: the twin Q functions; BCQ: its imitator and twin Q functions.
    assert len(package.networks) == {"cql": 2, "bcq": 3}.get(algo, 1)
    assert package.config.combine == ("bcq" if algo == "bcq" else "mean")
    np.testing.assert_array_equal(package.act(obs, mask), theirs.act(obs, mask))
    assert package.config.solver == "ddim" and package.config.family == "sd"
    assert package.config.training["episodes"] == 120


def test_export_cli_picks_the_eval_best_and_writes_a_card(
    runs: Path, dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    out = tmp_path / "policy"
    args = ["policy", "export", "--dataset", str(dataset), "--offline", str(runs / "offline")]
    assert (
        main(
            [
                *args,
                "--online",
                str(runs / "online"),
                "--eval",
                str(runs / "eval"),
                "--out",
                str(out),
            ]
        )
        == 0
    )
    assert (
        "wrote the cql policy (eval: NFE 2.50, gain vs frontier +0.0200)" in capsys.readouterr().out
    )
    policy = AdaptivePolicy.from_pretrained(out)
    assert policy.config.evaluation["nfe"] == 2.5
    card = (out / "README.md").read_text()
    assert "base_model: org/tiny-sd" in card and "sits **above** the frontier" in card
    assert "frontier: method=cql gain=+0.020" in card
    assert not list(tmp_path.glob(".policy.*"))  # no temporary folder left behind
    with pytest.raises(PolicyPackageError, match="no results for 'bc'"):
        export_policy(
            dataset, tmp_path / "bc", runs / "offline", eval_dir=runs / "eval", method="bc"
        )
    with pytest.raises(PolicyPackageError, match="method ppo needs --online"):
        export_policy(dataset, tmp_path / "ppo", runs / "offline", method="ppo")


def test_load_learnable_after_import_addiffusion(runs: Path) -> None:
    """Plain d3rlpy users: `import addiffusion` is enough for d3rlpy.load_learnable, whichever of
    the two is imported first."""
    for first, second in (("addiffusion", "d3rlpy"), ("d3rlpy", "addiffusion")):
        code = (
            f"import {first}, {second}\n"
            f"algo = d3rlpy.load_learnable({str(runs / 'offline' / 'policy.d3')!r})\n"
            "print(type(algo).__name__)\n"
        )
        out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
        assert out.returncode == 0, out.stderr[-2000:]
        assert out.stdout.strip() == "DiscreteIQL"
