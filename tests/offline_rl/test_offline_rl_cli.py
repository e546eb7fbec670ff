"""``addiffusion offline-rl train|verify`` end to end on a real (synthetic-content) dataset:
store written by the real ShardWriter -> datasets build -> relabel -> to_replay_buffers -> train."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml

from addiffusion.cli import run
from addiffusion.datasets.build import build_dataset
from addiffusion.datasets.config import DatasetsConfig
from addiffusion.datasets.d3rlpy_convert import dataset_table
from addiffusion.datasets.relabel import relabel
from addiffusion.datasets.synthetic import write_synthetic_store
from addiffusion.offline_rl.cli import register
from addiffusion.offline_rl.config import OfflineRLConfig
from addiffusion.rewards.config import RewardConfig
from addiffusion.task import read_info

torch.set_num_threads(1)

DEFAULT = OfflineRLConfig()
TINY = {
    "n_steps": 20,
    "n_steps_per_epoch": 10,
    "hidden_units": [8],
    "fqe": {"n_steps": 10, "batch_size": 16},
    "iql": {**DEFAULT.iql, "batch_size": 16},
    "cql": {**DEFAULT.cql, "batch_size": 16},
}
"""A tiny offline_rl section: 2 epochs (one checkpoint), a 10-step FQE of each point."""


def main(argv: list[str]) -> int:
    """Our subcommands only: ``addiffusion.cli.main`` imports every stage (diffusers included)."""
    parser = argparse.ArgumentParser(prog="addiffusion")
    register(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


@pytest.fixture(scope="module")
def dataset_and_rewards(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    root = tmp_path_factory.mktemp("offline_rl_data")
    # 6 prompts x 2 seeds, n_max 5, every 3rd prompt heldout; roots visiting step 2 branch there.
    write_synthetic_store(root / "store", branch_step=2, n_max=5)
    dataset = build_dataset(
        root / "store", root / "dataset", DatasetsConfig(chunk_rows=20, val_fraction=0.25)
    )
    rewards = root / "rewards.parquet"
    relabel(dataset, RewardConfig(), rewards)
    return dataset, rewards


def test_train_then_verify(
    dataset_and_rewards: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset, rewards = dataset_and_rewards
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"offline_rl": {**TINY, "baselines": ["cql"]}}))
    out = tmp_path / "run"
    argv = ["offline-rl", "train", "--dataset", str(dataset), "--rewards", str(rewards)]
    assert main([*argv, "--out", str(out), "--params", str(params), "--quiet"]) == 0
    printed = capsys.readouterr().out
    assert "offline-rl iql (seed 0): 20 steps, val stop regret" in printed
    assert "offline-rl cql (seed 0)" in printed and "FQE value" in printed

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["algo"] == "iql" and manifest["config"]["hidden_units"] == [8]
    assert manifest["config"]["iql"]["batch_size"] == 16
    assert manifest["observation_dim"] == read_info(dataset)["observation"]["dim"]
    assert manifest["observation"] == read_info(dataset)["observation"]
    assert manifest["allowed_actions"] == list(dataset_table(dataset).names)
    assert manifest["observation_drop"] == [] and manifest["checkpoints"] == ["checkpoints/10"]
    # The stage's FQE of the checkpoint and the final policy, on the validation prompt.
    ope = json.loads((out / "ope.json").read_text())
    assert [p["step"] for p in ope["points"]] == [10, 20]
    metrics = json.loads((out / "metrics.json").read_text())
    # 4 train prompts x 2 seeds; 1 prompt (2 roots) is validation. Branches are recorded paths
    # too (entered from their parent's row): 6 train roots + their 4 branches.
    assert metrics["train_stop"]["n_episodes"] == 10
    assert metrics["val"]["stop"]["n_episodes"] == 4  # 2 roots + 2 branches
    assert "td_error" in metrics["val"] and "cql" in metrics["baselines"]
    assert (out / "training.csv").read_text().startswith("epoch,")

    assert main(["offline-rl", "verify", "--policy", str(out / "policy.d3")]) == 0
    assert json.loads(capsys.readouterr().out)["sha256"] == manifest["sha256"]
    (out / "policy.d3").write_bytes((out / "policy.d3").read_bytes() + b"\0")
    assert main(["offline-rl", "verify", "--policy", str(out / "policy.d3")]) == 2
    assert "refusing to load" in capsys.readouterr().err


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"iql": {"expectile": 1.5}}, "offline_rl.iql.expectile must be in (0, 1), got 1.5"),
        ({"bcq": {"action_flexibility": 0.0}}, "offline_rl.bcq.action_flexibility must be in"),
        ({"cql": {"alpha": "big"}}, "offline_rl.cql.alpha must be a finite number"),
        ({"cql": {"n_critics": 1.5}}, "offline_rl.cql.n_critics must be an integer"),
        (
            {"iql": {"beta": 3.0}},
            "unknown key offline_rl.iql.beta: DiscreteIQLConfig has no scalar field 'beta'",
        ),
        ({"bc": {"observation_scaler": "none"}}, "offline_rl.bc.observation_scaler is set by"),
        ({"cql": {"encoder_factory": "x"}}, "offline_rl.cql.encoder_factory is set by"),
        # The flat keys of the old section are gone: each algorithm has its own.
        ({"batch_size": 16}, "unknown key offline_rl.batch_size"),
        ({"seed": 1}, "unknown key offline_rl.seed"),
        ({"algo": "sac"}, "offline_rl.algo must be one of iql, cql, bc, bcq"),
        ({"seeds": [1, 1]}, "offline_rl.seeds must be a list without repeats"),
        ({"action_space": "refine_only"}, "offline_rl.action_space must be one of"),
        ({"drop_observations": ["colour"]}, "offline_rl.drop_observations[0] must be one of"),
        (
            {"drop_observations": ["image_features", "text_features", "time", "quality"]},
            "offline_rl.drop_observations must be a list of distinct parts that keeps at least",
        ),
        ({"fqe": {"n_steps": -1}}, "offline_rl.fqe.n_steps must be >= 0"),
    ],
)
def test_bad_params_are_reported(
    section: dict, message: str, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"offline_rl": section}))
    argv = ["offline-rl", "train", "--dataset", "d", "--rewards", "r", "--out", str(tmp_path)]
    assert main([*argv, "--params", str(params)]) == 2
    assert message in capsys.readouterr().err


def test_ablations_reach_the_manifest_and_the_policy(
    dataset_and_rewards: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``action_space: stop_only`` and ``drop_observations: [quality]`` from the params file: the
    run's data, its manifest and the loaded policy all follow them."""
    from addiffusion.datasets.d3rlpy_convert import to_replay_buffers
    from addiffusion.diffusion.mdp import ObservationLayout
    from addiffusion.offline_rl.policy import load_policy

    dataset, rewards = dataset_and_rewards
    params = tmp_path / "params.yaml"
    ablation = {"action_space": "stop_only", "drop_observations": ["quality"]}
    params.write_text(yaml.safe_dump({"offline_rl": {**TINY, **ablation}}))
    out = tmp_path / "run"
    argv = ["offline-rl", "train", "--dataset", str(dataset), "--rewards", str(rewards)]
    assert main([*argv, "--out", str(out), "--params", str(params), "--quiet"]) == 0
    capsys.readouterr()

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["allowed_actions"] == ["jump-1", "stop"]
    assert manifest["observation_drop"] == ["quality"]
    assert manifest["config"]["action_space"] == "stop_only"
    assert manifest["observation"] == read_info(dataset)["observation"]
    for rel in manifest["checkpoints"]:  # the checkpoints carry the same restrictions
        ck = json.loads((out / rel / "manifest.json").read_text())
        assert ck["allowed_actions"] == ["jump-1", "stop"] and ck["observation_drop"] == ["quality"]
    # Trained on fewer transitions than the whole action space gives.
    full, _ = to_replay_buffers(dataset, rewards, 0.25, 0)
    assert 0 < manifest["data"]["train_transitions"] < full.transition_count

    policy = load_policy(out / "policy.d3")
    table = dataset_table(dataset)
    assert policy.allowed_actions == ("jump-1", "stop")
    assert policy.observation_drop == ("quality",)
    rng = np.random.default_rng(0)
    obs = rng.normal(size=(64, manifest["observation_dim"])).astype(np.float32)
    actions = policy.act(obs, np.ones((64, table.n), dtype=bool))
    assert set(actions.tolist()) <= {table.jump(1), table.stop}
    # The quality columns are never seen: changing them changes nothing.
    quality = ObservationLayout.from_dict(manifest["observation"]).columns("quality")
    other = obs.copy()
    other[:, quality] = rng.normal(size=(64, quality.stop - quality.start)) * 10
    np.testing.assert_array_equal(policy.scores(other), policy.scores(obs))


def test_stop_outcomes_found_in_converted_data(dataset_and_rewards: tuple[Path, Path]) -> None:
    """The stop evaluation finds every counterfactual stop the converter wrote, and none in the
    warm-up (a path's first row is step 0, where stop is illegal)."""
    from addiffusion.datasets.d3rlpy_convert import dataset_table, to_replay_buffers
    from addiffusion.offline_rl.stop_eval import stop_trajectories

    table = dataset_table(dataset_and_rewards[0])
    train, _ = to_replay_buffers(*dataset_and_rewards, 0.25, 0)
    trajs = stop_trajectories(train.episodes, table)
    assert len(trajs) == 10  # 6 roots + 4 branches (see test_train_then_verify)
    written = {
        np.asarray(e.observations[0], np.float32).tobytes()
        for e in train.episodes
        if e.size() == 1 and int(np.asarray(e.actions).reshape(-1)[0]) == table.stop
    }
    found = set()
    for t in trajs:
        assert np.isfinite(t.stop_rewards[-1])  # the recorded final stop
        for o, r in zip(t.observations[:-1], t.stop_rewards[:-1], strict=True):
            if np.isfinite(r):
                found.add(np.asarray(o, np.float32).tobytes())
    roots = [t for t in trajs if len(t.observations) > 1 and np.isnan(t.stop_rewards[0])]
    assert len(roots) == 6  # every root starts in the warm-up
    assert found == written
