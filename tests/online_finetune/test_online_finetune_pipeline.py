"""The whole chain through the real CLIs on the tiny built-in models: collect -> datasets build
-> relabel -> offline-rl train -> online-finetune. Slow (a minute or more on a loaded CPU):
``pytest -m slow tests/online_finetune``."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import yaml

from addiffusion.cli import main
from addiffusion.online_finetune.ppo import load_finetuned_policy
from addiffusion.task import read_task


@pytest.mark.slow
def test_cli_chain_on_a_collected_dataset(tmp_path: Path) -> None:
    params = {
        "collect": {
            "model": str(tmp_path / "tiny"),
            "scorer": str(tmp_path / "clip"),
            "n_max": 5,
            "n_prompts": 6,
            "seeds_per_prompt": 1,
            "shard_size": 6,
            "batch_size": 6,
            "device": "cpu",
        },
        "offline_rl": {
            "n_steps": 10,
            "n_steps_per_epoch": 10,
            "hidden_units": [16, 16],
            "fqe": {"n_steps": 0},
            "iql": {"batch_size": 8},
            "device": "cpu",
        },
        "online_finetune": {
            "n_envs": 3,
            "n_steps": 4,
            "iterations": 2,
            "batch_size": 6,
            "device": "cpu",
        },
    }
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump(params))
    ds, off, ft = tmp_path / "ds", tmp_path / "off", tmp_path / "ft"
    steps = [
        [
            "backbone",
            "build-tiny",
            "--out",
            str(tmp_path / "tiny"),
            "--clip-out",
            str(tmp_path / "clip"),
        ],
        ["collect", "--store", str(tmp_path / "store"), "--quiet"],
        ["datasets", "build", "--store", str(tmp_path / "store"), "--out", str(ds)],
        ["datasets", "relabel", "--dataset", str(ds), "--out", str(tmp_path / "r.parquet")],
        [
            "offline-rl",
            "train",
            "--dataset",
            str(ds),
            "--rewards",
            str(tmp_path / "r.parquet"),
            "--out",
            str(off),
            "--quiet",
            "--threads",
            "1",
        ],
        [
            "online-finetune",
            "--dataset",
            str(ds),
            "--offline",
            str(off),
            "--out",
            str(ft),
            "--quiet",
            "--threads",
            "1",
        ],
    ]
    for args in steps:
        assert main([*args, "--params", str(p)]) == 0, args

    task = read_task(ds)
    assert task.settings.n_max == 5 and set(task.component_stats) >= {"clip_score", "stability"}
    metrics = json.loads((ft / "metrics.json").read_text())
    assert metrics["iterations"] == 2 and metrics["init"] == "offline"
    assert json.loads((ft / "scratch" / "metrics.json").read_text())["init"] == "scratch"
    # the reward-hacking watch is on exactly when the task has a verifier component
    shares = [r["charts/hacking_share"] for r in metrics["history"] if r["charts/episodes"]]
    assert all((s is not None) == ("verifier" in task.components) for s in shares)
    policy = load_finetuned_policy(ft)
    assert policy.obs_dim == task.obs_dim and policy.table == task.actions
    t = task.actions
    obs = np.zeros((2, policy.obs_dim), np.float32)
    mask = np.zeros((2, t.n), bool)
    mask[0, t.jump(1)] = mask[1, t.stop] = True
    assert policy.act(obs, mask).tolist() == [t.jump(1), t.stop]
