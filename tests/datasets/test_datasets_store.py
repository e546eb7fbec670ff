from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest

from addiffusion.datasets.store import ShardWriter, completed_shards, read_store
from addiffusion.datasets.synthetic import synthetic_info
from addiffusion.datasets.validate import validate
from addiffusion.diffusion.actions import ActionTable

STOP = ActionTable.from_dict(synthetic_info(5, 8, 4)["actions"]).stop


def _episode(eid: str, n: int) -> tuple[dict, list[dict]]:
    ep = {
        "episode_id": eid,
        "prompt_id": 0,
        "prompt": "a red circle",
        "category": "simple",
        "split": "train",
        "seed": 0,
        "parent_episode_id": None,
        "branch_step": -1,
        "branch_action": -1,
        "num_steps": n,
    }
    steps = [
        {
            "episode_id": eid,
            "step": i,
            "timestep": 900.0 - i,
            "t_frac": 0.9,
            "sigma": 1.0,
            "action": STOP if i == n - 1 else 0,  # jump-1 ... stop
            "behavior_prob": 1.0,
            "nfe": i + 1,
            "refines_used": 0,
            "wall_time_s": 0.1,
            "peak_mem_bytes": 1,
            "clip_score": 0.2,
            "stability": 0.5,
        }
        for i in range(n)
    ]
    return ep, steps


def test_round_trip_and_checksums(store_master: Path) -> None:
    shards = read_store(store_master)
    assert [s.info["shard_index"] for s in shards] == [0, 1, 2]
    s = shards[0]
    assert s.episodes.height == 7  # 4 roots + 3 branches (root 2 never visits point 2)
    assert s.features["image_features"].shape == (s.steps.height, 8)
    assert s.features["text_features"].shape == (7, 4)
    assert s.features["thumbnails"].shape == (s.steps.height, 4, 4, 3)
    assert set(s.info["files"]) >= {"episodes.parquet", "steps.parquet", "episodes.tar"}
    # The Zarr arrays use the sharding codec (one shard file per array here).
    meta = json.loads((s.path / "features.zarr" / "image_features" / "zarr.json").read_text())
    assert meta["codecs"][0]["name"] == "sharding_indexed"
    assert validate(store_master) == []


def test_tmp_dirs_are_ignored_and_cleaned(tmp_path: Path) -> None:
    info = synthetic_info(n_max=3, image_dim=2, text_dim=2)
    # A crashed earlier attempt at shard 0 and an in-progress shard 1 of another process.
    (tmp_path / "shard-00000.tmp-99999").mkdir(parents=True)
    (tmp_path / "shard-00001.tmp-12345").mkdir()
    (tmp_path / "shard-00001.tmp-12345" / "shard.json").write_text("{}")
    assert completed_shards(tmp_path) == set()
    assert read_store(tmp_path) == []
    w = ShardWriter(tmp_path, 0, info)
    assert not (tmp_path / "shard-00000.tmp-99999").exists()  # stale tmp of its own index
    assert (tmp_path / "shard-00001.tmp-12345").exists()  # other indices untouched
    ep, steps = _episode("000000-0", 3)
    w.add_episode(ep, steps, np.zeros((3, 2), np.float32), np.zeros(2, np.float32))
    path = w.commit()
    assert path.name == "shard-00000" and completed_shards(tmp_path) == {0}
    assert not list(tmp_path.glob(f"shard-00000.tmp-{os.getpid()}"))
    with pytest.raises(FileExistsError, match="written by two processes"):
        w2 = ShardWriter(tmp_path, 0, info)
        w2.add_episode(ep, steps, np.zeros((3, 2), np.float32), np.zeros(2, np.float32))
        w2.commit()


def test_writer_rejects_bad_input_with_names(tmp_path: Path) -> None:
    w = ShardWriter(tmp_path, 3, synthetic_info(n_max=3, image_dim=2, text_dim=2))
    ep, steps = _episode("000001-0", 3)
    with pytest.raises(
        ValueError,
        match=r"shard 3 episode '000001-0': image_features must be "
        r"\(3, 2\), got \(3, 5\)",
    ):
        w.add_episode(ep, steps, np.zeros((3, 5)), np.zeros(2))
    with pytest.raises(ValueError, match="thumbnails must be uint8, got float32"):
        w.add_episode(
            ep, steps, np.zeros((3, 2)), np.zeros(2), thumbnails=np.zeros((3, 4, 4, 3), np.float32)
        )
    del steps[1]["clip_score"]
    with pytest.raises(ValueError, match=r"step row 1: lacks field\(s\) \['clip_score'\]"):
        w.add_episode(ep, steps, np.zeros((3, 2)), np.zeros(2))
    with pytest.raises(ValueError, match="no episodes"):
        w.commit()
    with pytest.raises(ValueError, match="lacks"):
        ShardWriter(tmp_path, 0, {"components": []})
