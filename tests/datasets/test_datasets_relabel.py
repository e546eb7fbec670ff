from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest

from addiffusion.config import ConfigError
from addiffusion.datasets.relabel import relabel
from addiffusion.datasets.store import file_checksums
from addiffusion.datasets.validate import validate
from addiffusion.rewards.config import RewardConfig
from addiffusion.rewards.reward import quality, step_reward, stop_reward

BRANCH_STEP, N_MAX = 2, 5  # as in conftest.py


def _episode(dataset: Path, eid: str) -> pl.DataFrame:
    return (
        pl.read_parquet(dataset / "data" / "steps").filter(pl.col("episode_id") == eid).sort("step")
    )


def test_rewards_match_the_reward_definition(dataset: Path, tmp_path: Path) -> None:
    cfg = RewardConfig(weights={"clip_score": 1.0, "stability": 0.5}, c_nfe=0.05)
    summary = relabel(dataset, cfg, tmp_path / "r.parquet")
    r = pl.read_parquet(tmp_path / "r.parquet")
    assert summary["rows"] == r.height == 62
    assert json.loads((tmp_path / "r.json").read_text())["rewards"]["c_nfe"] == 0.05
    stats = json.loads((dataset / "meta" / "info.json").read_text())["component_stats"]

    root, branch = _episode(dataset, "000000-0"), _episode(dataset, f"000000-0-b{BRANCH_STEP}")
    q = quality({c: root[c].to_numpy() for c in cfg.weights}, cfg, stats)
    got = r.filter(pl.col("episode_id") == "000000-0").sort("step")
    np.testing.assert_allclose(got["r_stop"], stop_reward(q, cfg), rtol=1e-5)
    np.testing.assert_allclose(
        got["r_action"][:-1], step_reward(q[:-1], q[1:], 1.0, cfg), rtol=1e-5, atol=1e-6
    )
    assert got["r_action"][N_MAX - 1] is None  # no continue after the last step
    # Root 000000-0 jumps by 1 and branches by refine at BRANCH_STEP. Refine at BRANCH_STEP -> the branch's first step, paying its extra NFE.
    qb = quality({c: branch[c].to_numpy() for c in cfg.weights}, cfg, stats)
    dnfe = branch["nfe"][0] - root["nfe"][BRANCH_STEP]
    assert dnfe == 1 + 2  # one evaluation + refine_k
    expected = step_reward(q[BRANCH_STEP], qb[0], dnfe, cfg)
    assert summary["branch_edges"] == 8
    enter = r.filter(pl.col("episode_id") == f"000000-0-b{BRANCH_STEP}").sort("step")
    assert enter["r_enter"][0] == pytest.approx(float(expected), rel=1e-5)
    assert enter["r_enter"][1] is None
    # Root 000000-1 jumps by 2 (0, 2, 4): r_action spans the jump to the next row by key.
    q1 = _episode(dataset, "000000-1")
    assert q1["step"].to_list() == [0, 2, 4]
    g1 = r.filter(pl.col("episode_id") == "000000-1").sort("step")
    qq = quality({c: q1[c].to_numpy() for c in cfg.weights}, cfg, stats)
    np.testing.assert_allclose(
        g1["r_action"][:-1], step_reward(qq[:-1], qq[1:], 1.0, cfg), rtol=1e-5, atol=1e-6
    )
    # Its branch takes jump-1 at point 2 instead of jump-2: enters at point 3 for one NFE.
    b1 = _episode(dataset, "000002-0-b2")
    assert b1["step"].to_list() == [3, 4]


def test_weights_change_rewards_never_the_data(dataset: Path, tmp_path: Path) -> None:
    before = file_checksums(dataset)
    relabel(dataset, RewardConfig(weights={"clip_score": 1.0}), tmp_path / "a.parquet")
    relabel(
        dataset, RewardConfig(weights={"clip_score": 1.0, "stability": 2.0}), tmp_path / "b.parquet"
    )
    relabel(dataset, RewardConfig(weights={"clip_score": 1.0}, c_nfe=0.5), tmp_path / "c.parquet")
    a, b, c = (pl.read_parquet(tmp_path / f"{n}.parquet") for n in "abc")
    assert not np.allclose(a["r_stop"], b["r_stop"])
    assert not np.allclose(a["r_action"].drop_nulls(), c["r_action"].drop_nulls())
    np.testing.assert_allclose(a["r_stop"], c["r_stop"])  # c_nfe only affects transitions
    assert file_checksums(dataset) == before and validate(dataset) == []


def test_unknown_component_is_named(dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="'pickscore'.*components: clip_score, stability"):
        relabel(dataset, RewardConfig(weights={"pickscore": 1.0}), tmp_path / "r.parquet")
