"""Faults a collector must survive: a changed config on resume, a taken rank, SIGKILL at any point,
a full disk, and reruns that must give the same bytes.

The store is compared file by file (sha256): with ``--no-timings`` two runs of one seed on one
machine write byte-identical shards, so "equals an uninterrupted run" means the same bytes."""

from __future__ import annotations

import errno
import hashlib
import json
import os
import random
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import yaml

from addiffusion.cli import main
from addiffusion.collect.collector import collect
from addiffusion.collect.config import CollectConfig
from addiffusion.collect.resume import LOCK_DIR, RankLock
from addiffusion.datasets.store import completed_shards, read_ledger, shard_paths
from addiffusion.datasets.validate import validate, validate_shard
from addiffusion.diffusion.backbone import save_tiny_pipeline
from addiffusion.rewards.clip import save_tiny_clip


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(pipeline folder, open_clip folder) of the built-in random tiny models."""
    root = tmp_path_factory.mktemp("fault-models")
    return save_tiny_pipeline(root / "tiny", 0), save_tiny_clip(root / "tiny-clip", 0)


def _section(models: tuple[Path, Path], **kw: object) -> dict:
    return (
        dict(
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
        | kw
    )


def _params(path: Path, models: tuple[Path, Path], **kw: object) -> Path:
    path.write_text(yaml.safe_dump({"collect": _section(models, **kw)}))
    return path


def _digest(store: Path) -> dict[str, str]:
    """sha256 of every file of a store, by relative path (the lock folder aside)."""
    return {
        p.relative_to(store).as_posix(): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(store.rglob("*"))
        if p.is_file() and LOCK_DIR not in p.relative_to(store).parts
    }


def _shard_files(store: Path) -> dict[str, str]:
    """:func:`_digest` of the shard folders and the manifest only: the ledger ``shards.jsonl``
    records commits in the order they happened, which differs between interrupted runs."""
    return {k: v for k, v in _digest(store).items() if k != "shards.jsonl"}


def _leftovers(root: Path) -> list[Path]:
    """Temporary files or folders, and lock files, anywhere under ``root``."""
    return [
        p for p in root.rglob("*") if ".tmp" in p.name or ".old-" in p.name or p.suffix == ".lock"
    ]


def _collect_cli(store: Path, params: Path, *extra: str) -> int:
    return main(["collect", "--store", str(store), "--params", str(params), "--quiet", *extra])


# --- resume guard -----------------------------------------------------------------------------


def test_resume_with_changed_episode_keys_is_refused_naming_the_key(
    tmp_path: Path, models: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("a red circle\na blue square\n")
    base = dict(n_prompts=2, prompts=str(prompts))
    store = tmp_path / "store"
    assert _collect_cli(store, _params(tmp_path / "p.yaml", models, **base)) == 0
    before = _digest(store)
    changes = [("seed", 0, 1), ("n_max", 3, 4), ("shard_size", 1, 2), ("branch_prob", 0.5, 0.25),
               ("record_thumbnails", True, False)]  # fmt: skip
    for key, old, new in changes:
        capsys.readouterr()
        params = _params(tmp_path / "p2.yaml", models, **{**base, key: new})
        assert _collect_cli(store, params) == 2, key
        err = capsys.readouterr().err
        assert f"collect.{key} is {new!r} in params but {old!r} in the store" in err, err
        assert "new --store" in err and f"delete {store}" in err
        assert "Traceback" not in err and len(err.strip().splitlines()) == 1
        assert _digest(store) == before, f"{key}: the refused run changed the store"
    # The same keys over an edited prompt file: other episodes, refused all the same.
    prompts.write_text("a green triangle\na blue square\n")
    assert _collect_cli(store, _params(tmp_path / "p.yaml", models, **base)) == 2
    assert f"was the prompt file {str(prompts)!r} changed" in capsys.readouterr().err
    assert _digest(store) == before
    # device and batch_size only change how the same episodes are computed: resumable.
    prompts.write_text("a red circle\na blue square\n")
    params = _params(tmp_path / "p3.yaml", models, **base, batch_size=2, device="auto")
    assert _collect_cli(store, params) == 0
    assert "0 shards written, 2 already complete" in capsys.readouterr().out
    assert _digest(store) == before


def test_partial_store_is_not_mixed_with_another_config(
    tmp_path: Path, models: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    store = tmp_path / "store"
    rank = ("--rank", "1", "--world-size", "2")
    assert _collect_cli(store, _params(tmp_path / "a.yaml", models), "--rank", "0",
                        "--world-size", "2") == 0  # fmt: skip
    assert completed_shards(store) == {0, 2}
    before = _digest(store)
    assert _collect_cli(store, _params(tmp_path / "b.yaml", models, seed=7), *rank) == 2
    assert "collect.seed is 7 in params but 0 in the store" in capsys.readouterr().err
    assert _digest(store) == before and completed_shards(store) == {0, 2}
    assert _collect_cli(store, _params(tmp_path / "c.yaml", models, batch_size=2), *rank) == 0
    assert completed_shards(store) == {0, 1, 2, 3}
    assert validate(store) == []


def test_store_without_recorded_settings_is_refused(
    tmp_path: Path, models: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    """A store written before the guard (no manifest, no collect_config) cannot be checked."""
    store = tmp_path / "store"
    params = _params(tmp_path / "p.yaml", models, n_prompts=1)
    assert _collect_cli(store, params) == 0
    (store / "collect.json").unlink()
    meta = store / "shard-00000" / "shard.json"
    info = json.loads(meta.read_text())
    del info["collect_config"]
    meta.write_text(json.dumps(info))
    assert _collect_cli(store, params) == 2
    err = capsys.readouterr().err
    assert str(meta) in err and "records no collect settings" in err


# --- rank locks -------------------------------------------------------------------------------


def test_a_taken_rank_is_refused_and_a_dead_lock_is_not_a_lock(
    tmp_path: Path, models: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    store, params = tmp_path / "store", _params(tmp_path / "p.yaml", models)
    with RankLock(store, 1, 2) as held:  # another collector on rank 1 of 2
        assert _collect_cli(store, params, "--rank", "1", "--world-size", "2") == 2
        err = capsys.readouterr().err
        assert "rank 1 of 2 is taken" in err and str(held.path) in err, err
        assert f"pid {os.getpid()}" in err
        assert _collect_cli(store, params, "--rank", "0", "--world-size", "3") == 2
        assert "another world size" in capsys.readouterr().err
        assert _collect_cli(store, params, "--rank", "0", "--world-size", "2") == 0
        assert completed_shards(store) == {0, 2}
    # A lock file left by a killed collector: nobody holds it, so the next collector takes it.
    (store / LOCK_DIR / "rank-00001-of-00002.lock").write_text("host gone pid 1 since never\n")
    assert _collect_cli(store, params, "--rank", "1", "--world-size", "2") == 0
    assert completed_shards(store) == {0, 1, 2, 3} and validate(store) == []
    assert not _leftovers(store)


# --- determinism ------------------------------------------------------------------------------


def test_same_seed_same_machine_gives_byte_identical_store(
    tmp_path: Path, models: tuple[Path, Path]
) -> None:
    cfg = CollectConfig.from_dict(_section(models, n_prompts=3))
    for name in ("a", "b"):
        collect(cfg, tmp_path / name, progress=False, record_timings=False)
    a, b = _digest(tmp_path / "a"), _digest(tmp_path / "b")
    assert a == b and any(k.endswith("steps.parquet") for k in a)
    # With timings, the measured columns are the only difference.
    collect(cfg, tmp_path / "c", progress=False)
    steps = pq.read_table(tmp_path / "c" / "shard-00000" / "steps.parquet")
    ref = pq.read_table(tmp_path / "a" / "shard-00000" / "steps.parquet")
    timing = ["wall_time_s", "peak_mem_bytes"]
    assert steps.drop_columns(timing).equals(ref.drop_columns(timing))


# --- full disk, simulated (ENOSPC at a chosen write) -------------------------------------------


def _enospc_at(monkeypatch: pytest.MonkeyPatch, nth: int) -> None:
    """Make the ``nth`` Parquet write (anywhere) fail as a full disk does."""
    real, calls = pq.write_table, [0]

    def write_table(*args: object, **kwargs: object) -> None:
        calls[0] += 1
        if calls[0] == nth:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        real(*args, **kwargs)

    monkeypatch.setattr(pq, "write_table", write_table)


def test_full_disk_during_collect_and_build_loses_nothing(
    tmp_path: Path,
    models: tuple[Path, Path],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    params = _params(tmp_path / "p.yaml", models)
    collect(CollectConfig.from_dict(_section(models)), tmp_path / "ref", progress=False,
            record_timings=False)  # fmt: skip
    store = tmp_path / "store"
    with monkeypatch.context() as m:
        _enospc_at(m, 3)  # shard 1's first table: shard 0 is complete
        assert _collect_cli(store, params, "--no-timings") == 1
    err = capsys.readouterr().err
    assert "no space left on device" in err and "rerun the same command" in err, err
    assert completed_shards(store) == {0} and not _leftovers(store)
    assert validate_shard(store / "shard-00000") == []
    assert _collect_cli(store, params, "--no-timings") == 0  # space freed
    assert _shard_files(store) == _shard_files(tmp_path / "ref")

    out = tmp_path / "dataset"
    assert main(["datasets", "build", "--store", str(store), "--out", str(out)]) == 0
    before = _digest(out)
    capsys.readouterr()
    with monkeypatch.context() as m:
        _enospc_at(m, 1)
        rc = main(["datasets", "build", "--store", str(store), "--out", str(out)])
    message = capsys.readouterr().err
    assert rc == 2 and "no space left on the device" in message, message
    assert "Traceback" not in message and len(message.strip().splitlines()) == 1
    assert _digest(out) == before, "the previous dataset was changed"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        ["dataset", "p.yaml", "ref", "store"]
    ), "a partial dataset was left"
    assert main(["datasets", "build", "--store", str(store), "--out", str(out)]) == 0
    assert validate(out) == []


# --- full disk, real (a small tmpfs) ------------------------------------------------------------


def _fill(mount: Path, leave: int) -> Path:
    """Fill ``mount`` until ``leave`` bytes are free."""
    st = os.statvfs(mount)
    filler = mount / "filler"
    with filler.open("ab") as f:
        f.write(b"\0" * max(st.f_bavail * st.f_frsize - leave, 0))
    return filler


@pytest.mark.slow
def test_full_tmpfs_during_collect_and_build(
    tmp_path: Path, models: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    mount = tmp_path / "mnt"
    mount.mkdir()
    if os.geteuid() != 0 or shutil.which("mount") is None:
        pytest.skip("mounting a small tmpfs needs root")
    res = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(mount)],
                         capture_output=True, text=True)  # fmt: skip
    if res.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {res.stderr.strip()}")
    try:
        params = _params(tmp_path / "p.yaml", models, n_prompts=6)
        ref = tmp_path / "ref"
        collect(CollectConfig.from_dict(_section(models, n_prompts=6)), ref, progress=False,
                record_timings=False)  # fmt: skip
        store = mount / "store"
        filler = _fill(mount, 160_000)  # about half the store
        assert _collect_cli(store, params, "--no-timings") == 1
        err = capsys.readouterr().err
        assert "no space left on device" in err, err
        done = completed_shards(store)
        assert 0 < len(done) < 6, done
        assert all(validate_shard(p) == [] for p in shard_paths(store))
        assert not _leftovers(store)
        filler.unlink()
        assert _collect_cli(store, params, "--no-timings") == 0
        assert _shard_files(store) == _shard_files(ref) and validate(store) == []

        out = mount / "dataset"
        assert main(["datasets", "build", "--store", str(store), "--out", str(out)]) == 0
        before = _digest(out)
        filler = _fill(mount, 40_000)
        rc = main(["datasets", "build", "--store", str(store), "--out", str(out)])
        message = capsys.readouterr().err
        assert rc == 2 and "no space left on the device" in message, message
        assert _digest(out) == before
        assert sorted(p.name for p in mount.iterdir()) == ["dataset", "filler", "store"]
        filler.unlink()
        assert main(["datasets", "build", "--store", str(store), "--out", str(out)]) == 0
        assert validate(out) == []
    finally:
        subprocess.run(["umount", str(mount)], check=False)


# --- SIGKILL at seeded points, and four ranks at once (real processes) --------------------------

HOOK = """
import importlib, os, signal, sys, time
target, nth, when, go = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
from addiffusion.cli import main
import addiffusion.collect.collector
owner_name, _, attr = target.partition(":")
owner = importlib.import_module(owner_name)
*path, name = attr.split(".")
for part in path:
    owner = getattr(owner, part)
original, calls = getattr(owner, name), [0]
def hooked(*args, **kwargs):
    calls[0] += 1
    if calls[0] == nth and when == "before":
        os.kill(os.getpid(), signal.SIGKILL)
    if calls[0] == nth and when == "wait":  # hold on here until the test says go
        while not os.path.exists(go):
            time.sleep(0.05)
    try:
        return original(*args, **kwargs)
    finally:  # also when the call raises (os.link onto an existing manifest)
        if calls[0] == nth and when == "after":
            os.kill(os.getpid(), signal.SIGKILL)
setattr(owner, name, hooked)
sys.exit(main(sys.argv[5:]))
"""

KILL_POINTS = [
    # startup
    ("addiffusion.collect.collector:plan_episodes", "before", 1),
    ("addiffusion.collect.resume:RankLock.__enter__", "after", 1),
    ("addiffusion.collect.resume:init_store", "before", 1),
    ("os:link", "before", 1),
    ("os:link", "after", 1),
    ("addiffusion.collect.collector:build_sampler", "after", 1),
    # mid-shard
    ("addiffusion.diffusion.sampler:StepwiseSampler.apply", "before", 3),
    ("addiffusion.collect.collector:run_with_branches", "after", 1),
    ("addiffusion.collect.collector:_write_trace", "before", 2),
    ("addiffusion.collect.collector:_write_trace", "after", 2),
    # the shard commit: tables, Zarr arrays, tar, checksums, shard.json, rename, ledger
    ("addiffusion.datasets.store:ShardWriter.commit", "before", 2),
    ("pyarrow.parquet:write_table", "before", 2),
    ("pyarrow.parquet:write_table", "after", 1),
    ("addiffusion.datasets.store:write_sharded_array", "before", 3),
    ("addiffusion.datasets.store:write_sharded_array", "after", 1),
    ("addiffusion.datasets.store:write_episode_samples", "after", 2),
    ("addiffusion.datasets.store:file_checksums", "after", 1),
    ("pathlib:Path.write_text", "after", 2),
    ("os:rename", "before", 2),
    ("os:rename", "after", 1),
    ("addiffusion.datasets.store:ShardWriter._record", "before", 1),
    ("addiffusion.datasets.store:ShardWriter.commit", "after", 1),
]
"""(where, before/after the call, at most which call): each run draws the call from 1..that."""


def _env() -> dict[str, str]:
    return {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}


def _hooked(
    store: Path, params: Path, target: str, when: str, nth: int, go: Path, *extra: str
) -> list[str]:
    return [sys.executable, "-c", HOOK, target, str(nth), when, str(go), "collect", "--store",
            str(store), "--params", str(params), "--quiet", "--no-timings", *extra]  # fmt: skip


@pytest.mark.slow
def test_sigkill_at_seeded_points_then_rerun_equals_an_uninterrupted_run(
    tmp_path: Path, models: tuple[Path, Path]
) -> None:
    params = _params(tmp_path / "p.yaml", models, n_prompts=14)
    ref, store = tmp_path / "ref", tmp_path / "store"
    plain = [sys.executable, "-m", "addiffusion", "collect", "--params", str(params), "--quiet",
             "--no-timings"]  # fmt: skip
    out = subprocess.run([*plain, "--store", str(ref)], env=_env(), capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    reference = _digest(ref)
    rng = random.Random(16)
    points = [(t, w, rng.randint(1, n)) for t, w, n in KILL_POINTS]
    rng.shuffle(points)
    assert len(points) >= 20
    # One store, killed again and again: each run resumes what the killed ones left.
    for target, when, nth in points:
        cmd = _hooked(store, params, target, when, nth, tmp_path / "go")
        res = subprocess.run(cmd, env=_env(), capture_output=True, text=True, timeout=600)
        assert res.returncode == -signal.SIGKILL, (target, when, nth, res.stderr[-3000:])
        # Whatever a kill leaves: every complete shard is whole, and the one of the clean run.
        for shard in shard_paths(store):
            assert validate_shard(shard) == [], (target, when, nth, shard)
            files = {k: v for k, v in _digest(store).items() if k.startswith(shard.name + "/")}
            assert files == {k: reference[k] for k in files}, (target, when, nth, shard)
    assert len(completed_shards(store)) < 14, "the kills left nothing to resume"
    out = subprocess.run(
        [*plain, "--store", str(store)], env=_env(), capture_output=True, text=True
    )
    assert out.returncode == 0, out.stderr[-3000:]
    visible = {k: v for k, v in _shard_files(store).items() if not k.startswith(".")}
    assert visible == _shard_files(ref)
    assert validate(store) == []
    # No temporary file of any killed run (the manifest's included) is left behind ...
    assert not _leftovers(store), _leftovers(store)
    # ... and the ledger records every shard, as the uninterrupted run's does.
    assert read_ledger(store) == read_ledger(ref)


@pytest.mark.slow
def test_four_ranks_at_once_and_a_second_collector_on_a_taken_rank(
    tmp_path: Path, models: tuple[Path, Path]
) -> None:
    params = _params(tmp_path / "p.yaml", models, n_prompts=8)
    ref, store, go = tmp_path / "ref", tmp_path / "store", tmp_path / "go"
    collect(CollectConfig.from_dict(_section(models, n_prompts=8)), ref, progress=False,
            record_timings=False)  # fmt: skip
    world = ("--world-size", "4")
    # Rank 2 holds its lock and waits (inside the lock, before its first shard) until "go".
    procs = {
        r: subprocess.Popen(
            _hooked(
                store,
                params,
                "addiffusion.collect.resume:init_store",
                "wait" if r == 2 else "none",
                1,
                go,
                "--rank",
                str(r),
                *world,
            ),  # fmt: skip
            env=_env(),
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for r in range(4)
    }
    lock = store / LOCK_DIR / "rank-00002-of-00004.lock"
    deadline = time.monotonic() + 300
    while not (lock.exists() and lock.read_text()) and time.monotonic() < deadline:
        time.sleep(0.1)
    cmd = [sys.executable, "-m", "addiffusion", "collect", "--store", str(store), "--params",
           str(params), "--quiet", "--no-timings"]  # fmt: skip
    second = subprocess.run([*cmd, "--rank", "2", *world], env=_env(), capture_output=True,
                            text=True)  # fmt: skip
    assert second.returncode == 2, second.stderr[-3000:]
    assert "rank 2 of 4 is taken" in second.stderr and str(lock) in second.stderr
    assert "Traceback" not in second.stderr
    other = subprocess.run([*cmd, "--rank", "0", "--world-size", "2"], env=_env(),
                           capture_output=True, text=True)  # fmt: skip
    assert other.returncode == 2 and "another world size" in other.stderr, other.stderr[-3000:]
    go.touch()
    outs = {r: p.communicate(timeout=600) for r, p in procs.items()}
    for r, p in procs.items():
        assert p.returncode == 0, outs[r][1][-3000:]
        assert "collect: 2 shards written, 0 already complete" in outs[r][0], outs[r][0]
    assert completed_shards(store) == set(range(8))
    assert _shard_files(store) == _shard_files(ref)
    assert sorted(read_ledger(store)) == list(range(8))
    assert len((store / "shards.jsonl").read_text().splitlines()) == 8  # each shard once
    assert validate(store) == [] and not _leftovers(store)


def test_a_run_that_failed_before_its_first_shard_does_not_block_the_fixed_one(
    models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A bad scorer path fails the run after the store recorded its settings; once the path is
    fixed, the rerun records its own (nothing was collected under the bad ones)."""
    store = tmp_path / "store"
    bad = _params(tmp_path / "bad.yaml", models, scorer=str(tmp_path / "no_clip"))
    assert main(["collect", "--store", str(store), "--params", str(bad), "--quiet"]) == 2
    good = _params(tmp_path / "good.yaml", models)
    assert main(["collect", "--store", str(store), "--params", str(good), "--quiet"]) == 0
    assert completed_shards(store) == {0, 1, 2, 3}
    capsys.readouterr()
