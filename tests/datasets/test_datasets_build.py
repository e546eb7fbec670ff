from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import polars as pl
import pyarrow.parquet as pq
import pytest
import zarr

from addiffusion.datasets.build import BuildError, build_dataset
from addiffusion.datasets.config import DatasetsConfig
from addiffusion.datasets.hub import iter_episodes, load
from addiffusion.datasets.store import sha256_file
from addiffusion.datasets.validate import validate


def test_build_layout_and_validate_clean(dataset: Path) -> None:
    assert validate(dataset) == []
    info = json.loads((dataset / "meta" / "info.json").read_text())
    assert info["schema_version"] == 1 and info["layout_version"] == 1
    assert info["observation"] == {
        "image_dim": 8,
        "text_dim": 4,
        "time_dim": 16,
        "quality_dim": 5,
        "dim": 33,
    }
    assert set(info["component_stats"]) == {"clip_score", "stability"}
    assert info["counts"] == {
        "shards": 3,
        "episodes": 20,
        "root_episodes": 12,
        "steps": 62,
        "episodes_per_rl_split": {"heldout": 6, "train": 10, "val": 4},
    }
    assert len(list((dataset / "data" / "steps").glob("train-*.parquet"))) > 1  # chunked
    ep = pl.read_parquet(dataset / "data" / "episodes")
    steps = pl.read_parquet(dataset / "data" / "steps")
    # Validation split by prompt: no prompt in both.
    val_prompts = set(ep.filter(pl.col("rl_split") == "val")["prompt_id"])
    train_prompts = set(ep.filter(pl.col("rl_split") == "train")["prompt_id"])
    assert val_prompts and not val_prompts & train_prompts
    # Merged feature rows point into the merged arrays, one row per step.
    feats = zarr.open_group(dataset / "features.zarr", mode="r")
    assert sorted(steps["feature_row"].to_list()) == list(range(feats["image_features"].shape[0]))
    # Stats are from the train split only.
    train = steps.join(ep.filter(pl.col("split") == "train"), on="episode_id", how="semi")
    assert info["component_stats"]["clip_score"]["mean"] == pytest.approx(
        float(train["clip_score"].mean()), rel=1e-5
    )


def test_hf_datasets_loads_the_folder(dataset: Path) -> None:
    import datasets

    steps = datasets.load_dataset(str(dataset), "steps")
    assert steps["train"].num_rows + steps["heldout"].num_rows == 62
    assert "clip_score" in steps["train"].column_names
    episodes = datasets.load_dataset(str(dataset), "episodes")
    assert episodes["heldout"].num_rows == 6
    wds = datasets.load_dataset(
        "webdataset", data_files=str(dataset / "webdataset" / "*.tar"), split="train"
    )
    assert wds.num_rows == 20
    row = wds[0]
    assert row["json"]["steps"][0]["step"] >= 0 and row["png"].size[1] == 4


def test_stream_and_load(dataset: Path) -> None:
    eps = list(iter_episodes(dataset))
    assert len(eps) == 20
    root = next(e for e in eps if e["parent_episode_id"] is None)
    assert len(root["steps"]) == 5 and root["filmstrip"].shape == (4, 20, 3)
    assert load(str(dataset)) == dataset


def _corrupt_truncate(shard: Path) -> str:
    p = shard / "steps.parquet"
    p.write_bytes(p.read_bytes()[:200])
    return "steps.parquet: cannot read Parquet"


def _corrupt_zarr(shard: Path) -> str:
    chunk = shard / "features.zarr" / "image_features" / "c" / "0" / "0"
    data = bytearray(chunk.read_bytes())
    for i in range(8, 40):
        data[i] ^= 0xFF
    chunk.write_bytes(bytes(data))
    return "image_features/c/0/0: sha256 differs"


def _drop_column(shard: Path) -> str:
    p = shard / "steps.parquet"
    pq.write_table(pq.read_table(p).drop_columns(["sigma"]), p)
    # Re-sign the manifest so the schema check itself must catch it.
    meta = json.loads((shard / "shard.json").read_text())
    meta["files"]["steps.parquet"] = sha256_file(p)
    (shard / "shard.json").write_text(json.dumps(meta))
    return "steps.parquet: missing column 'sigma'"


@pytest.mark.parametrize("corrupt", [_corrupt_truncate, _corrupt_zarr, _drop_column])
def test_corrupted_shard_reported_and_refused(store: Path, tmp_path: Path, corrupt) -> None:
    expected = corrupt(store / "shard-00001")
    problems = [str(p) for p in validate(store)]
    assert any(expected in p and "shard-00001" in p for p in problems), problems
    out = tmp_path / "out"
    with pytest.raises(BuildError, match="nothing was written"):
        build_dataset(store, out, DatasetsConfig())
    assert not out.exists()
    assert [p.name for p in tmp_path.iterdir()] == ["store"]  # no temp leftovers


def test_failed_rebuild_keeps_existing_output(store: Path, tmp_path: Path) -> None:
    out = build_dataset(store, tmp_path / "out", DatasetsConfig())
    before = sha256_file(out / "meta" / "info.json")
    _corrupt_truncate(store / "shard-00002")
    with pytest.raises(BuildError):
        build_dataset(store, out, DatasetsConfig())
    assert sha256_file(out / "meta" / "info.json") == before and validate(out) == []


def test_row_level_problems_name_the_row(store: Path) -> None:
    shard = store / "shard-00000"
    p = shard / "steps.parquet"
    table = pl.read_parquet(p).with_columns(
        pl.when(pl.int_range(pl.len()) == 3)
        .then(np.nan)
        .otherwise(pl.col("clip_score"))
        .cast(pl.Float32)
        .alias("clip_score"),
        pl.when(pl.int_range(pl.len()) == 6)
        .then(99)
        .otherwise(pl.col("step"))
        .cast(pl.Int32)
        .alias("step"),
    )
    table.write_parquet(p)
    problems = [str(x) for x in validate(shard)]
    info = json.loads((shard / "shard.json").read_text())
    assert any(
        x.endswith("steps.parquet row 3: clip_score is nan (must be finite)") for x in problems
    ), problems
    assert any(x.endswith("steps.parquet row 6: step 99 is off the grid [0, 5)") for x in problems)
    assert info["actions"]["actions"][-2]["name"] == "stop"


def _resign(shard: Path, name: str) -> None:
    meta = json.loads((shard / "shard.json").read_text())
    meta["files"][name] = sha256_file(shard / name)
    (shard / "shard.json").write_text(json.dumps(meta))


def test_wrong_next_step_is_named(store: Path) -> None:
    shard = store / "shard-00000"
    p = shard / "steps.parquet"
    steps = pl.read_parquet(p)
    # Root 000000-0 jumps by 1 (0, 1, 2, 3, 4); record jump-2 at its step 1 instead.
    row = steps.with_row_index().filter(
        (pl.col("episode_id") == "000000-0") & (pl.col("step") == 1)
    )
    i = int(row["index"][0])
    steps.with_columns(
        pl.when(pl.int_range(pl.len()) == i)
        .then(1)
        .otherwise(pl.col("action"))
        .cast(pl.Int8)
        .alias("action")
    ).write_parquet(p)
    _resign(shard, "steps.parquet")
    problems = [str(x) for x in validate(shard)]
    want = (
        f"steps.parquet row {i}: episode '000000-0': action jump-2 at step 1 leads to step 3, "
        "but the episode's next row is step 2"
    )
    assert any(x.endswith(want) for x in problems), problems


def test_bad_branch_action_is_named(store: Path) -> None:
    shard = store / "shard-00000"
    p = shard / "episodes.parquet"
    eps = pl.read_parquet(p)
    i = eps["episode_id"].to_list().index("000000-0-b2")
    stop = info_table(shard).stop
    eps.with_columns(
        pl.when(pl.int_range(pl.len()) == i)
        .then(stop)
        .otherwise(pl.col("branch_action"))
        .cast(pl.Int32)
        .alias("branch_action")
    ).write_parquet(p)
    _resign(shard, "episodes.parquet")
    problems = [str(x) for x in validate(shard)]
    assert any(
        f"episodes.parquet row {i}: branch '000000-0-b2': branch_action {stop} is not a legal "
        "non-stop action at step 2 of '000000-0'" in x
        for x in problems
    ), problems


def info_table(shard: Path):
    from addiffusion.diffusion.actions import ActionTable

    return ActionTable.from_dict(json.loads((shard / "shard.json").read_text())["actions"])


def test_stale_tmp_shard_is_not_built(store: Path, tmp_path: Path) -> None:
    (store / "shard-00007.tmp-4242").mkdir()
    (store / "shard-00007.tmp-4242" / "steps.parquet").write_bytes(b"half")
    out = build_dataset(store, tmp_path / "out", DatasetsConfig(write_webdataset=False))
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["source_shards"] == [0, 1, 2]
    assert not (out / "webdataset").exists() and validate(out) == []
