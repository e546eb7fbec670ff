"""A .d3 policy is a pickle: it is loaded only when a trust root away from its folder (the
project's dvc.lock, the user's trust store) records its hash, and eval loads only the policies
params name. A crafted pickle with a manifest rewritten to match never runs."""

from __future__ import annotations

import hashlib
import json
import pickle
import shutil
import warnings
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch
from d3rlpy.constants import ActionSpace
from d3rlpy.dataset import MDPDataset

from addiffusion.cli import main
from addiffusion.diffusion.actions import ActionTable
from addiffusion.eval.cli import load_offline_policies
from addiffusion.offline_rl import trust
from addiffusion.offline_rl.config import FQEParams, OfflineRLConfig
from addiffusion.offline_rl.policy import PolicyLoadError, load_policy
from addiffusion.offline_rl.train import train_offline
from addiffusion.online_finetune.offline_init import load_offline_networks
from addiffusion.policy.export import package_offline

torch.set_num_threads(1)

N_STEPS, OBS_DIM = 4, 5
TABLE = ActionTable.build([1], N_STEPS, 1, refine_budget=0, refine_k=2)
TINY = dict(
    n_steps=20,
    n_steps_per_epoch=10,  # a checkpoint at step 10, trusted like policy.d3
    hidden_units=[8, 8],
    device="cpu",
    seeds=[0],
    fqe=FQEParams(n_steps=0),
    iql={**OfflineRLConfig().iql, "batch_size": 16},
    cql={**OfflineRLConfig().cql, "batch_size": 16, "target_update_interval": 10},
)


def _buffer(n_episodes: int) -> MDPDataset:
    """Root episodes (continue, ..., stop) and one-step counterfactual stops."""
    rng = np.random.default_rng(0)
    obs, actions, rewards, terminals = [], [], [], []
    for _ in range(n_episodes):
        o = rng.normal(size=(N_STEPS, OBS_DIM)).astype(np.float32)
        obs.append(o)
        actions += [0] * (N_STEPS - 1) + [1]
        rewards += [0.0] * (N_STEPS - 1) + [1.0]
        terminals += [0.0] * (N_STEPS - 1) + [1.0]
        for i in range(1, N_STEPS - 1):
            obs.append(o[i : i + 1])
            actions.append(1)
            rewards.append(float(rng.random()))
            terminals.append(1.0)
    return MDPDataset(
        observations=np.concatenate(obs),
        actions=np.asarray(actions, dtype=np.int64),
        rewards=np.asarray(rewards, dtype=np.float32).reshape(-1, 1),
        terminals=np.asarray(terminals, dtype=np.float32),
        action_space=ActionSpace.DISCRETE,
        action_size=TABLE.n,
    )


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[Path, Path]]:
    """A tiny iql run with a cql baseline, trained with a private trust store."""
    root = tmp_path_factory.mktemp("trust")
    store = root / "store" / "trusted.json"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv(trust.STORE_ENV, str(store))
        mp.chdir(root)  # in no DVC project: only the store vouches
        cfg = OfflineRLConfig(algo="iql", baselines=["cql"], **TINY)
        train_offline(_buffer(12), None, cfg, root / "run", actions=TABLE, log=False)
        yield root / "run", store


@pytest.fixture
def env(trained: tuple[Path, Path], monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """Each test: the trained run's store, outside any DVC project; returns the run folder."""
    run, store = trained
    monkeypatch.setenv(trust.STORE_ENV, str(store))
    monkeypatch.chdir(tmp_path)
    return run


class _WritesMarker:
    """Unpickling this creates the marker file: code run on load."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _craft(run: Path, dest: Path, marker: Path) -> Path:
    """A copy of ``run`` whose policy.d3 runs code on load, its manifest rewritten to match."""
    shutil.copytree(run, dest)
    data = pickle.dumps({"version": "2.8.1", "config": _WritesMarker(marker), "torch": b""})
    (dest / "policy.d3").write_bytes(data)
    manifest = json.loads((dest / "manifest.json").read_text())
    manifest["sha256"] = hashlib.sha256(data).hexdigest()
    (dest / "manifest.json").write_text(json.dumps(manifest))
    return dest


def test_trained_policy_loads_and_is_recorded_outside_its_folder(env: Path) -> None:
    run = env
    entries = trust.read_store()
    checkpoints = (run / "checkpoints" / "10", run / "baselines" / "cql" / "checkpoints" / "10")
    for sub in (run, run / "baselines" / "cql", *checkpoints):
        sha = json.loads((sub / "manifest.json").read_text())["sha256"]
        assert entries[sha]["source"].startswith("offline-rl train")
        assert load_policy(sub / "policy.d3").manifest["sha256"] == sha
    assert set(load_offline_policies(run, "cpu", ["iql", "cql"])) == {"iql", "cql"}
    assert load_offline_networks(run).critic is not None


def test_crafted_pickle_with_matching_manifest_never_runs(env: Path, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    evil = _craft(env, tmp_path / "evil_run", marker)
    with pytest.raises(PolicyLoadError, match="offline-rl trust .*policy.d3") as e:
        load_policy(evil / "policy.d3")
    assert "is a pickle" in str(e.value) and "trust store" in str(e.value)
    # Every loader of .d3 files goes through the same check.
    with pytest.raises(PolicyLoadError, match="refusing to load"):
        load_offline_policies(evil, "cpu", ["iql", "cql"])
    with pytest.raises(PolicyLoadError, match="refusing to load"):
        load_offline_networks(evil)
    with pytest.raises(PolicyLoadError, match="refusing to load"):
        package_offline(evil, task=None)  # type: ignore[arg-type]  (refused before the task is read)
    assert main(["offline-rl", "verify", "--policy", str(evil / "policy.d3")]) == 2
    assert not marker.exists()
    # Control: the crafted file does run code when unpickled.
    control = tmp_path / "control"
    _craft(env, tmp_path / "control_run", control)
    pickle.loads((tmp_path / "control_run" / "policy.d3").read_bytes())
    assert control.exists()


def test_dropped_in_baseline_is_ignored_and_a_named_one_must_exist(
    env: Path, tmp_path: Path
) -> None:
    run = tmp_path / "run"
    shutil.copytree(env, run)
    marker = tmp_path / "pwned"
    _craft(env / "baselines" / "cql", run / "baselines" / "evil", marker)
    with pytest.warns(UserWarning, match="ignoring .*baselines/evil"):
        policies = load_offline_policies(run, "cpu", ["iql", "cql"])
    assert set(policies) == {"iql", "cql"} and not marker.exists()
    # Default (no names): the baselines the run's manifest lists, never the glob.
    with pytest.warns(UserWarning, match="baselines/evil"):
        assert set(load_offline_policies(run, "cpu")) == {"iql", "cql"}
    with pytest.raises(FileNotFoundError, match="baselines/bc/policy.d3 not found.*'bc'"):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            load_offline_policies(run, "cpu", ["iql", "cql", "bc"])
    with pytest.raises(PolicyLoadError, match="offline_rl.algo is 'cql'.*'iql' policy"):
        load_offline_policies(run, "cpu", ["cql"])
    assert not marker.exists()


def test_untrusted_file_is_refused_until_trusted_explicitly(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture
) -> None:
    """A user who downloaded a run: not in their store, so refused; `offline-rl trust` after
    checking it (here against a wrong, then the right, hash) makes it load."""
    store = tmp_path / "mine" / "trusted.json"
    monkeypatch.setenv(trust.STORE_ENV, str(store))
    path = env / "policy.d3"
    sha = hashlib.sha256(path.read_bytes()).hexdigest()
    with pytest.raises(PolicyLoadError, match=f"offline-rl trust {path}.*--trust-sha256 {sha}"):
        load_policy(path)
    assert load_policy(path, trusted_sha256=sha).algo_name == "iql"  # a one-off, not recorded
    assert not store.exists()
    assert main(["offline-rl", "trust", str(path), "--sha256", "0" * 64]) == 2
    assert "nothing was trusted" in capsys.readouterr().err and not store.exists()
    assert main(["offline-rl", "trust", str(path), "--sha256", sha]) == 0
    assert trust.read_store()[sha]["source"] == "addiffusion offline-rl trust"
    assert load_policy(path).algo_name == "iql"
    # A store that cannot be read refuses, naming it.
    store.write_text("{not json")
    with pytest.raises(PolicyLoadError, match=f"trust store {store} is unreadable"):
        load_policy(path)


def _md5(path: Path) -> str:
    return hashlib.md5(path.read_bytes()).hexdigest()


def _dir_out(root: Path, folder: Path) -> str:
    """The md5 dvc.lock records for ``folder`` as a directory out (``<md5>.dir``), its listing
    written to the project's cache as `dvc repro` leaves it."""
    listing = [
        {"md5": _md5(p), "relpath": p.relative_to(folder).as_posix()}
        for p in sorted(folder.rglob("*"))
        if p.is_file()
    ]
    raw = json.dumps(listing, sort_keys=True).encode()
    dir_md5 = hashlib.md5(raw).hexdigest()
    cache = root / ".dvc" / "cache" / "files" / "md5" / dir_md5[:2] / (dir_md5[2:] + ".dir")
    cache.parent.mkdir(parents=True, exist_ok=True)
    cache.write_bytes(raw)
    return dir_md5 + ".dir"


def _dvc_project(env: Path, root: Path) -> Path:
    """A DVC project whose dvc.lock records the run as stage offline_rl's outs, as `dvc repro`
    writes it: policy.d3 a file out, baselines and checkpoints directory outs listed in the
    cache."""
    run = root / "models" / "offline_rl"
    shutil.copytree(env, run)
    (root / ".dvc").mkdir()
    dir_md5 = _dir_out(root, run / "baselines")[: -len(".dir")]
    outs = [
        {"path": "models/offline_rl/policy.d3", "hash": "md5", "md5": _md5(run / "policy.d3")},
        {"path": "models/offline_rl/baselines", "hash": "md5", "md5": dir_md5 + ".dir"},
        {
            "path": "models/offline_rl/checkpoints",
            "hash": "md5",
            "md5": _dir_out(root, run / "checkpoints"),
        },
    ]
    lock = {"schema": "2.0", "stages": {"offline_rl": {"cmd": "x", "outs": outs}}}
    (root / "dvc.lock").write_text(json.dumps(lock))  # JSON is YAML
    return run


def test_dvc_lock_outs_are_a_trust_root(
    env: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv(trust.STORE_ENV, str(tmp_path / "empty" / "trusted.json"))
    root = tmp_path / "project"
    run = _dvc_project(env, root)
    monkeypatch.chdir(root / "models")  # DVC finds the project from any folder inside it
    assert set(load_offline_policies(run, "cpu", ["iql", "cql"])) == {"iql", "cql"}
    assert load_policy(run / "checkpoints" / "10" / "policy.d3").manifest["step"] == 10

    # A dvc.lock dropped beside the file is not the project's: outside it, nothing vouches.
    fake = tmp_path / "fake"
    shutil.copytree(run, fake)
    (fake / ".dvc").mkdir()
    lock = {
        "stages": {
            "s": {"outs": [{"path": "policy.d3", "hash": "md5", "md5": _md5(run / "policy.d3")}]}
        }
    }
    (fake / "dvc.lock").write_text(json.dumps(lock))
    monkeypatch.chdir(tmp_path)
    with pytest.raises(PolicyLoadError, match="in no DVC project"):
        load_policy(fake / "policy.d3")

    # A directory listing that does not hash to dvc.lock's md5 vouches for nothing.
    monkeypatch.chdir(root)
    for cache in (root / ".dvc" / "cache").rglob("*.dir"):
        cache.write_bytes(cache.read_bytes().replace(b"[{", b"[ {"))
    with pytest.raises(PolicyLoadError, match="listing is not in the cache"):
        load_policy(run / "baselines" / "cql" / "policy.d3")
    with pytest.raises(PolicyLoadError, match="listing is not in the cache"):
        load_policy(run / "checkpoints" / "10" / "policy.d3")
    # A file that changed after the stage wrote it is refused (before unpickling).
    marker = tmp_path / "pwned"
    shutil.rmtree(run)
    _craft(env, run, marker)
    with pytest.raises(PolicyLoadError, match=r"stage 'offline_rl' recorded md5"):
        load_policy(run / "policy.d3")
    assert not marker.exists()
