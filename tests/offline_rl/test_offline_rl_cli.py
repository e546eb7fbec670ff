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
from addiffusion.datasets.relabel import relabel
from addiffusion.datasets.synthetic import write_synthetic_store
from addiffusion.offline_rl.cli import register
from addiffusion.rewards.config import RewardConfig
from addiffusion.task import read_info

torch.set_num_threads(1)


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
    section = {"n_steps": 20, "n_steps_per_epoch": 10, "hidden_units": [8], "batch_size": 16}
    params.write_text(yaml.safe_dump({"offline_rl": {**section, "baselines": ["cql"]}}))
    out = tmp_path / "run"
    argv = ["offline-rl", "train", "--dataset", str(dataset), "--rewards", str(rewards)]
    assert main([*argv, "--out", str(out), "--params", str(params), "--quiet"]) == 0
    assert "val stop regret" in capsys.readouterr().out

    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["algo"] == "iql" and manifest["config"]["hidden_units"] == [8]
    assert manifest["observation_dim"] == read_info(dataset)["observation"]["dim"]
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


def test_bad_params_are_reported(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"offline_rl": {"expectile": 1.5}}))
    argv = ["offline-rl", "train", "--dataset", "d", "--rewards", "r", "--out", str(tmp_path)]
    assert main([*argv, "--params", str(params)]) == 2
    assert "offline_rl.expectile must be in (0, 1), got 1.5" in capsys.readouterr().err


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
