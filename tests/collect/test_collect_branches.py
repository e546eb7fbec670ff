"""The jumping behaviour policy: roots on many schedules, generic (parent, step, action) branches."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl

from addiffusion.collect.collector import collect
from addiffusion.collect.config import CollectConfig
from addiffusion.datasets.store import read_store
from addiffusion.diffusion.actions import ActionTable


def _cfg(models: tuple[Path, Path], **kw: object) -> CollectConfig:
    base = dict(
        model=str(models[0]),
        scorer=str(models[1]),
        n_max=8,
        strides=[1, 2, 4],
        warmup=1,
        refine_budget=1,
        refine_k=2,
        branch_prob=1.0,
        max_branches=1,
        n_prompts=6,
        seeds_per_prompt=1,
        shard_size=6,
        batch_size=6,
        device="cpu",
    )
    return CollectConfig.from_dict({**base, **kw})


def test_roots_follow_jump_paths_and_branches_take_another_action(
    tmp_path: Path, tiny_models: tuple[Path, Path]
) -> None:
    cfg = _cfg(tiny_models)
    summary = collect(cfg, tmp_path / "store", progress=False)
    (shard,) = read_store(tmp_path / "store")
    table = ActionTable.from_dict(shard.info["actions"])
    assert table.names == ("jump-1", "jump-2", "jump-4", "stop", "refine")
    eps, steps = shard.episodes, shard.steps
    roots = eps.filter(pl.col("parent_episode_id").is_null())
    branches = eps.filter(pl.col("parent_episode_id").is_not_null())
    assert roots.height == 6 and branches.height == 6 and summary.episodes == 12
    paths = set()
    for ep in eps.iter_rows(named=True):
        rows = steps.filter(pl.col("episode_id") == ep["episode_id"]).sort("step")
        s, a, nfe = rows["step"].to_list(), rows["action"].to_list(), rows["nfe"].to_list()
        # Every path ends at the last point with stop; each action leads to the next row.
        assert s[-1] == cfg.n_max - 1 and a[-1] == table.stop
        for i in range(len(s) - 1):
            assert s[i + 1] == table.target(s[i], a[i]) and nfe[i + 1] == nfe[i] + 1
        if ep["parent_episode_id"] is None:
            assert s[0] == 0 and nfe[0] == 1
            paths.add(tuple(s))
            continue
        # A branch: the parent's row at branch_step, another legal action, then its own rows.
        i, b = ep["branch_step"], ep["branch_action"]
        assert ep["episode_id"] == f"{ep['parent_episode_id']}-b{i}"
        parent = steps.filter(pl.col("episode_id") == ep["parent_episode_id"]).sort("step")
        prow = parent.filter(pl.col("step") == i).row(0, named=True)
        assert b != prow["action"] and b != table.stop
        assert table.mask(i, prow["refines_used"])[b]
        assert s[0] == table.target(i, b)
        assert nfe[0] == prow["nfe"] + table.actions[b].nfe
        feats = shard.features["image_features"]
        if b == table.refine:
            assert rows["refines_used"][0] == 1
            same = parent.filter(pl.col("step") == s[0])
            if same.height:  # the root also visited that point, without refining
                assert not np.allclose(feats[rows["feature_row"][0]], feats[same["feature_row"][0]])
    # Six roots under a mix of constant and random strides visit more than one schedule.
    assert len(paths) > 1
    # Behaviour probabilities: 1 on constant-stride roots, 1/3 on random ones, 1 at the stop.
    probs = steps.filter(pl.col("action") != table.stop)["behavior_prob"].unique().to_list()
    assert set(np.round(probs, 6)) <= {1.0, round(1 / 3, 6)}
    assert shard.info["behavior_policy"]["branch_prob"] == 1.0


def test_branch_probability_zero_records_roots_only(
    tmp_path: Path, tiny_models: tuple[Path, Path]
) -> None:
    cfg = _cfg(tiny_models, branch_prob=0.0, n_prompts=2, shard_size=2, batch_size=2)
    collect(cfg, tmp_path / "store", progress=False)
    (shard,) = read_store(tmp_path / "store")
    assert shard.episodes["parent_episode_id"].null_count() == 2
