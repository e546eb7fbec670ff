"""``collect.profile_blocks``: per-block latency and memory land in the steps table and survive
``datasets build``; ``bench collect --profile-blocks`` prints and plots where a step goes."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from addiffusion.collect.collector import collect
from addiffusion.collect.config import CollectConfig
from addiffusion.datasets.build import build_dataset
from addiffusion.datasets.config import DatasetsConfig
from addiffusion.datasets.schema import BLOCK_PROFILE_FIELDS
from addiffusion.datasets.store import read_store
from addiffusion.datasets.validate import validate_dataset, validate_shard

COLUMNS = [name for name, _ in BLOCK_PROFILE_FIELDS]


def _cfg(make: Callable[..., CollectConfig], **kw: object) -> CollectConfig:
    base = dict(
        refine_k=1,
        branch_prob=1.0,
        n_prompts=2,
        heldout_fraction=0.0,
        shard_size=2,
        batch_size=2,
    )
    return make(**{**base, **kw})


def test_profiled_store_has_block_columns_that_survive_build(
    tmp_path: Path, small_collect: Callable[..., CollectConfig]
) -> None:
    collect(_cfg(small_collect, profile_blocks=True), tmp_path / "store", progress=False)
    (shard,) = read_store(tmp_path / "store")
    assert validate_shard(shard.path) == []
    layout = shard.info["block_profile"]
    assert {"down_blocks.0", "mid_block", "up_blocks.0"} <= set(layout["blocks"])
    assert "down_blocks.0/resnet" in layout["parts"] and layout["parts"][-1] == "other"
    steps = shard.steps
    times = np.array(steps["block_time_s"].to_list())
    peaks = np.array(steps["block_peak_mem_bytes"].to_list())
    assert times.shape == (steps.height, len(layout["parts"]))
    assert peaks.shape == (steps.height, len(layout["blocks"]))
    assert (times >= 0).all() and (peaks >= 0).all()
    # Every step evaluated the denoiser (branches: refine or a jump), so every step has time
    # in its resnets, and the parts stay within the step's wall time.
    resnet = [j for j, p in enumerate(layout["parts"]) if p.endswith("/resnet")]
    assert (times[:, resnet].sum(1) > 0).all()
    assert (times.sum(1) <= steps["wall_time_s"].to_numpy() * 1.01).all()

    out = build_dataset(tmp_path / "store", tmp_path / "ds", DatasetsConfig(val_fraction=0.0))
    assert validate_dataset(out) == []
    built = pl.read_parquet(out / "data" / "steps" / "train-00000.parquet")
    assert set(COLUMNS) <= set(built.columns)
    assert built.sort("episode_id", "step")["block_time_s"].to_list() == (
        steps.sort("episode_id", "step")["block_time_s"].to_list()
    )


def test_unprofiled_store_has_no_block_columns(
    tmp_path: Path, small_collect: Callable[..., CollectConfig]
) -> None:
    collect(_cfg(small_collect, branch_prob=0.0), tmp_path / "store", progress=False)
    (shard,) = read_store(tmp_path / "store")
    assert "block_profile" not in shard.info
    assert not set(COLUMNS) & set(shard.steps.columns)
    out = build_dataset(tmp_path / "store", tmp_path / "ds", DatasetsConfig(val_fraction=0.0))
    assert validate_dataset(out) == []


def test_profile_blocks_must_be_a_bool() -> None:
    with pytest.raises(Exception, match="profile_blocks"):
        CollectConfig.from_dict({"profile_blocks": "yes please"})


def test_bench_collect_profile_blocks_prints_and_plots(
    tmp_path: Path, tiny_models: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    from addiffusion.cli import main

    params = tmp_path / "params.yaml"
    collect_section = {
        "model": str(tiny_models[0]),
        "scorer": str(tiny_models[1]),
        "n_max": 2,
        "device": "cpu",
    }
    params.write_text(yaml.safe_dump({"collect": collect_section}))
    plot = tmp_path / "blocks.png"
    argv = ["bench", "collect", "--params", str(params), "--batch", "1", "--repeats", "1"]
    argv += ["--observe-with", "vae"]
    assert main([*argv, "--profile-blocks", "--plot", str(plot)]) == 0
    out = capsys.readouterr().out
    assert "down_blocks.0/resnet" in out and "mid_block" in out
    assert plot.stat().st_size > 1000
