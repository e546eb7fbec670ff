"""Teacher trajectories through the trajectory store and back: the rebuilt states and teacher
predictions are the teacher's own run; an offline warm-start trains on them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
import torch
from distill_tiny import SHAPES, tiny_config

from addiffusion.datasets.store import read_store
from addiffusion.diffusion.solvers import SolverHistory, solver_step
from addiffusion.distill.pair import (
    AlignmentError,
    draw_noise,
    encode,
    guided,
    initial_latents,
    load_pair,
)
from addiffusion.distill.teacher_store import (
    read_teacher_trajectories,
    write_teacher_trajectories,
)
from addiffusion.distill.train import train
from addiffusion.rewards.clip import ClipScorer


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    pair = load_pair(tiny_config(), "cpu")
    out = tmp_path_factory.mktemp("teacher") / "store"
    prompts = [(0, "a red circle", "simple"), (1, "two blue squares", "medium")]
    n = write_teacher_trajectories(
        pair, ClipScorer(str(SHAPES / "clip")), prompts, [5, 6], out, "shapes", shard_size=3
    )
    assert n == 2
    return out


def test_round_trip_rebuilds_the_teachers_run(store: Path) -> None:
    shards = read_store(store)
    assert [len(s.episodes) for s in shards] == [3, 1]
    assert shards[0].info["has_latents"] and shards[0].steps["action"].to_list()[-1] == 1  # stop
    pair = load_pair(tiny_config(), "cpu")
    data = read_teacher_trajectories(store, pair)
    assert data.states.shape == (4, 4, 4, 8, 8) and data.prompts[1] == "a red circle"
    # Episode 1 is ("a red circle", seed 6): run the teacher on its own and compare.
    cond = encode(pair, ["a red circle"])
    x = initial_latents(pair, draw_noise(pair, [6]))
    history = SolverHistory()
    for i in range(4):
        out = guided(
            pair.teacher.unet,
            pair.teacher,
            pair.scheduler,
            pair.space,
            x,
            i,
            cond.teacher,
            pair.guidance_scale,
        ).detach()
        assert torch.allclose(data.states[1, i], x[0], atol=2e-2), i
        assert torch.allclose(data.targets[1, i], out[0], atol=5e-2), i  # x̂0 stored as fp16
        x = solver_step(pair.scheduler, history, x, out, i, i + 1)


def test_other_timesteps_are_refused(store: Path) -> None:
    pair = load_pair(tiny_config(n_steps=3), "cpu")
    with pytest.raises(AlignmentError):
        read_teacher_trajectories(store, pair)


def test_offline_warm_start_trains_on_the_store(store: Path, tmp_path: Path) -> None:
    cfg = dataclasses.replace(tiny_config(), offline_store=str(store), offline_steps=2)
    train(cfg, tmp_path / "run", progress=False)
    rows = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["phase"] for r in rows] == ["offline", "offline", "on-policy", "on-policy"]
    assert all(r["mse"] > 0 for r in rows)
