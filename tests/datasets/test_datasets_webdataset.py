"""The WebDataset tars as a Hugging Face ``datasets`` user reads them.

``datasets``' webdataset builder infers the feature types from the first samples of the first
tar, so the store here follows the collector's order (each shard: its roots, then their branches)
with more roots per shard than the builder looks at: the first samples are all roots.
"""

from __future__ import annotations

import io
import json
import tarfile
from pathlib import Path

import datasets
import polars as pl
import pyarrow as pa
import pytest
from datasets.packaged_modules.webdataset.webdataset import WebDataset

from addiffusion.datasets.build import build_dataset
from addiffusion.datasets.config import DatasetsConfig
from addiffusion.datasets.hub import iter_episodes
from addiffusion.datasets.schema import EPISODES_SCHEMA, JSON_ROOT_PARENT
from addiffusion.datasets.store import steps_schema, write_episode_samples
from addiffusion.datasets.synthetic import COMPONENTS, write_synthetic_store


@pytest.fixture(scope="module")
def roots_first(tmp_path_factory: pytest.TempPathFactory) -> Path:
    store = tmp_path_factory.mktemp("roots_first_store")
    write_synthetic_store(store, branch_step=2, n_max=5, shard_size=6, branches_last=True)
    out = tmp_path_factory.mktemp("roots_first_built") / "dataset"
    return build_dataset(store, out, DatasetsConfig(chunk_rows=20))


def _first_records(tar_path: Path, n: int) -> list[dict]:
    with tarfile.open(tar_path) as tar:
        members = [m for m in tar.getmembers() if m.name.endswith(".json")][:n]
        return [json.load(tar.extractfile(m)) for m in members]


def test_first_samples_are_roots(roots_first: Path) -> None:
    # Guards the premise of the tests below: the builder sees roots only when inferring types.
    first_tar = sorted((roots_first / "webdataset").glob("*.tar"))[0]
    first = _first_records(first_tar, WebDataset.NUM_EXAMPLES_FOR_FEATURES_INFERENCE)
    assert len(first) == WebDataset.NUM_EXAMPLES_FOR_FEATURES_INFERENCE
    assert all(r["branch_step"] == -1 for r in first)


def _check_rows(rows: list[dict], dataset: Path) -> None:
    episodes = pl.read_parquet(dataset / "data" / "episodes")
    parents = dict(episodes.select("episode_id", "parent_episode_id").iter_rows())
    assert sorted(r["json"]["episode_id"] for r in rows) == sorted(parents)
    for r in rows:
        ep = r["json"]
        parent = parents[ep["episode_id"]]
        if parent is None:
            assert ep["parent_episode_id"] == JSON_ROOT_PARENT == ""
            assert ep["branch_step"] == ep["branch_action"] == -1
        else:
            assert ep["parent_episode_id"] == parent and ep["branch_step"] == 2
        assert len(ep["steps"]) == ep["num_steps"] and r["png"].size == (4 * ep["num_steps"], 4)


def test_load_dataset_webdataset_as_in_the_readme(roots_first: Path, tmp_path: Path) -> None:
    wds = datasets.load_dataset(
        "webdataset",
        data_files=str(roots_first / "webdataset" / "*.tar"),
        split="train",
        cache_dir=str(tmp_path / "hf"),
    )
    assert wds.num_rows == 20
    ep = wds.features["json"]
    assert ep["parent_episode_id"] == datasets.Value("string")
    assert ep["steps"].feature["clip_score"] == datasets.Value("float64")
    _check_rows(list(wds), roots_first)


def test_load_dataset_webdataset_streaming(roots_first: Path) -> None:
    wds = datasets.load_dataset(
        "webdataset",
        data_files=str(roots_first / "webdataset" / "*.tar"),
        split="train",
        streaming=True,
    )
    _check_rows(list(wds), roots_first)


def test_iter_episodes_gives_the_parquet_rows(roots_first: Path) -> None:
    episodes = pl.read_parquet(roots_first / "data" / "episodes")
    parents = dict(episodes.select("episode_id", "parent_episode_id").iter_rows())
    got = {e["episode_id"]: e["parent_episode_id"] for e in iter_episodes(roots_first)}
    assert got == parents and sum(p is None for p in got.values()) == 12


def test_no_null_reaches_the_json() -> None:
    ep = {n: 0 for n in EPISODES_SCHEMA.names} | {
        "episode_id": "000000-0",
        "prompt": "p",
        "category": "c",
        "split": "train",
        "parent_episode_id": None,
        "num_steps": 1,
    }
    schema = steps_schema(COMPONENTS)
    row = {n: 0 for n in schema.names} | {"episode_id": "000000-0", "wall_time_s": None}
    tar = tarfile.open(fileobj=io.BytesIO(), mode="w")
    with pytest.raises(ValueError, match=r"'000000-0' step 0: wall_time_s is null"):
        write_episode_samples(
            tar,
            pa.Table.from_pylist([ep], schema=EPISODES_SCHEMA),
            pa.Table.from_pylist([row], schema=schema),
            [],
        )
