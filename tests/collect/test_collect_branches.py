from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest

from addiffusion.collect.collector import collect
from addiffusion.collect.config import CollectConfig
from addiffusion.config import ConfigError
from addiffusion.datasets.store import read_store
from addiffusion.diffusion import mdp


def _cfg(models: tuple[Path, Path], **kw: object) -> CollectConfig:
    base = dict(
        model=str(models[0]),
        scorer=str(models[1]),
        n_max=4,
        warmup=1,
        refine_budget=1,
        refine_k=2,
        branch_prob=1.0,
        max_branches=1,
        n_prompts=2,
        seeds_per_prompt=1,
        shard_size=2,
        batch_size=2,
        device="cpu",
    )
    return CollectConfig.from_dict({**base, **kw})


def test_roots_and_refine_branches(tmp_path: Path, tiny_models: tuple[Path, Path]) -> None:
    cfg = _cfg(tiny_models)
    summary = collect(cfg, tmp_path / "store", progress=False)
    (shard,) = read_store(tmp_path / "store")
    eps, steps = shard.episodes, shard.steps
    roots = eps.filter(pl.col("parent_episode_id").is_null())
    branches = eps.filter(pl.col("parent_episode_id").is_not_null())
    assert roots.height == 2 and branches.height == 2 and summary.episodes == 4
    for br in branches.iter_rows(named=True):
        i = br["branch_step"]
        assert i == cfg.warmup  # branch_prob 1: the first refine-legal step
        assert br["episode_id"] == f"{br['parent_episode_id']}-b{i}"
        rows = steps.filter(pl.col("episode_id") == br["episode_id"]).sort("step")
        assert rows["step"].to_list() == list(range(i + 1, cfg.n_max))
        first = rows.row(0, named=True)
        # s_{i+1}' after refine: k re-denoise NFE plus the evaluation at t_{i+1}.
        assert first["nfe"] == i + 2 + cfg.refine_k and first["refines_used"] == 1
        parent = steps.filter(
            (pl.col("episode_id") == br["parent_episode_id"]) & (pl.col("step") == i + 1)
        ).row(0, named=True)
        feats = shard.features["image_features"]
        assert not np.allclose(feats[first["feature_row"]], feats[parent["feature_row"]])
    root_rows = steps.filter(pl.col("episode_id").is_in(roots["episode_id"].implode()))
    # Behaviour probabilities: continue 1 - p where refine is legal, 1 in warm-up, stop 1 at the end.
    warm = root_rows.filter(pl.col("step") < cfg.warmup)
    mid = root_rows.filter((pl.col("step") >= cfg.warmup) & (pl.col("step") < cfg.n_max - 1))
    last = root_rows.filter(pl.col("step") == cfg.n_max - 1)
    assert (warm["behavior_prob"] == 1.0).all() and (mid["behavior_prob"] == 0.0).all()
    assert (last["action"] == mdp.STOP).all() and (mid["action"] == mdp.CONTINUE).all()
    assert shard.info["behavior_policy"]["branch_prob"] == 1.0


def test_branch_prob_needs_refine_budget(tiny_models: tuple[Path, Path]) -> None:
    with pytest.raises(ConfigError, match="collect.branch_prob"):
        _cfg(tiny_models, refine_budget=0, branch_prob=0.5)
