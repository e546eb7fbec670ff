"""Many collectors and restarts: ranks write disjoint shards whose union is the single-process
run, and a killed collector resumes with every episode stored exactly once."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml

from addiffusion.collect.collector import collect, plan_episodes
from addiffusion.collect.config import CollectConfig
from addiffusion.datasets.store import completed_shards, read_store


def _section(models: tuple[Path, Path]) -> dict:
    return dict(
        model=str(models[0]),
        scorer=str(models[1]),
        n_max=3,
        n_prompts=4,
        seeds_per_prompt=1,
        shard_size=1,
        batch_size=1,
        branch_prob=0.5,
        device="cpu",
    )


def _contents(store: Path) -> dict[str, tuple]:
    """episode id -> (step rows without timings, its image features), over the whole store."""
    out: dict[str, tuple] = {}
    for shard in read_store(store):
        feats = shard.features["image_features"][...]
        steps = shard.steps.drop("wall_time_s", "peak_mem_bytes")
        for eid in shard.episodes["episode_id"]:
            assert eid not in out, f"episode {eid} stored twice"
            rows = steps.filter(pl.col("episode_id") == eid).sort("step")
            out[eid] = (rows.drop("feature_row").rows(), feats[rows["feature_row"].to_numpy()])
    return out


def _assert_same(a: dict[str, tuple], b: dict[str, tuple]) -> None:
    assert sorted(a) == sorted(b)
    for eid in a:
        assert a[eid][0] == b[eid][0], eid
        np.testing.assert_allclose(a[eid][1], b[eid][1], atol=1e-5)


def test_ranks_union_equals_single_run_and_resume_skips_done(
    tmp_path: Path, tiny_models: tuple[Path, Path]
) -> None:
    cfg = CollectConfig.from_dict(_section(tiny_models))
    single = tmp_path / "single"
    collect(cfg, single, progress=False)
    multi = tmp_path / "multi"
    s0 = collect(cfg, multi, rank=0, world_size=2, progress=False)
    assert completed_shards(multi) == {0, 2}
    # A crashed attempt at shard 1 left its temporary folder behind.
    (multi / "shard-00001.tmp-99999").mkdir()
    s1 = collect(cfg, multi, rank=1, world_size=2, progress=False)
    assert (s0.shards_written, s1.shards_written) == (2, 2)
    assert not list(multi.glob("*.tmp-*"))
    _assert_same(_contents(single), _contents(multi))
    roots = {s.episode_id for s in plan_episodes(cfg)}
    assert roots <= set(_contents(multi))
    again = collect(cfg, multi, progress=False)
    assert (again.shards_written, again.shards_skipped) == (0, 4)


def _write_params(tmp: Path, models: tuple[Path, Path], **kw: object) -> Path:
    path = tmp / "params.yaml"
    path.write_text(yaml.safe_dump({"collect": {**_section(models), **kw}}))
    return path


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


@pytest.mark.slow
def test_accelerate_launch_two_processes(tmp_path: Path, tiny_models: tuple[Path, Path]) -> None:
    params = _write_params(tmp_path, tiny_models)
    collect(CollectConfig.from_dict(_section(tiny_models)), tmp_path / "single", progress=False)
    accelerate = shutil.which("accelerate") or str(Path(sys.executable).parent / "accelerate")
    # On a CPU-only box --multi_gpu still means "torchrun": one process per rank, RANK/WORLD_SIZE set.
    cmd = [accelerate, "launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "-m", "addiffusion", "collect",
           "--store", str(tmp_path / "multi"), "--params", str(params), "--quiet"]  # fmt: skip
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.count("collect: 2 shards written") == 2, out.stdout
    _assert_same(_contents(tmp_path / "single"), _contents(tmp_path / "multi"))


@pytest.mark.slow
def test_sigkill_mid_run_then_restart(tmp_path: Path, tiny_models: tuple[Path, Path]) -> None:
    params = _write_params(tmp_path, tiny_models, n_prompts=6)
    store = tmp_path / "store"
    cmd = [sys.executable, "-m", "addiffusion", "collect", "--store", str(store),
           "--params", str(params), "--quiet"]  # fmt: skip
    proc = subprocess.Popen(cmd, env=_env(), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 300
    while not completed_shards(store) and time.monotonic() < deadline and proc.poll() is None:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    done_before = completed_shards(store)
    assert 0 < len(done_before) < 6, f"kill landed outside the run: {done_before}"
    out = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stderr[-3000:]
    assert f"{len(done_before)} already complete" in out.stdout
    assert completed_shards(store) == set(range(6)) and not list(store.glob("*.tmp-*"))
    cfg = CollectConfig.from_dict({**_section(tiny_models), "n_prompts": 6})
    fresh = tmp_path / "fresh"
    collect(cfg, fresh, progress=False)
    _assert_same(_contents(fresh), _contents(store))
