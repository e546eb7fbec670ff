"""export_onnx / ``offline-rl export-onnx``: the ONNX graph acts like the IQL, CQL, BC and BCQ
policy."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from offline_rl_stop_mdp import TABLE, make_buffer

from addiffusion.cli import run
from addiffusion.offline_rl.cli import register
from addiffusion.offline_rl.config import ALGORITHMS, FQEParams, OfflineRLConfig
from addiffusion.offline_rl.onnx_export import export_onnx
from addiffusion.offline_rl.policy import OfflinePolicy, load_policy
from addiffusion.offline_rl.train import train_offline

onnx = pytest.importorskip("onnx", reason="export_onnx needs the onnx package")

torch.set_num_threads(1)
ALGO_DIRS = {"iql": ".", "cql": "baselines/cql", "bc": "baselines/bc", "bcq": "baselines/bcq"}


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    # Barely trained: the export must reproduce whatever the networks compute.
    out = tmp_path_factory.mktemp("offline_rl_onnx")
    base = OfflineRLConfig()
    cfg = OfflineRLConfig(
        algo="iql",
        baselines=["cql", "bc", "bcq"],
        n_steps=20,
        n_steps_per_epoch=20,
        hidden_units=[16, 16],
        device="cpu",
        seeds=[0],
        fqe=FQEParams(n_steps=0),
        **{name: {**base.settings(name), "batch_size": 16} for name in ALGORITHMS},
    )
    train_offline(make_buffer(10, seed=0), make_buffer(4, seed=1), cfg, out, actions=TABLE)
    return out


def _policy(run_dir: Path, algo: str) -> OfflinePolicy:
    return load_policy(run_dir / ALGO_DIRS[algo] / "policy.d3")


def _inputs(policy: OfflinePolicy, n: int = 257) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(0)
    obs = rng.standard_normal((n, policy.observation_dim)).astype(np.float32) * 2.0
    mask = rng.random((n, policy.action_size)) < 0.5
    mask[np.arange(n), rng.integers(0, policy.action_size, n)] = True  # >= 1 legal action
    mask[0] = True
    return obs, mask


def _onnxruntime(path: Path, obs: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    ort = pytest.importorskip("onnxruntime")
    return ort.InferenceSession(str(path)).run(None, {"obs": obs, "mask": mask})


def _reference(path: Path, obs: np.ndarray, mask: np.ndarray) -> list[np.ndarray]:
    from onnx.reference import ReferenceEvaluator

    return ReferenceEvaluator(str(path)).run(None, {"obs": obs, "mask": mask})


@pytest.mark.parametrize("runner", [_onnxruntime, _reference], ids=["onnxruntime", "reference"])
@pytest.mark.parametrize("algo", list(ALGO_DIRS))
def test_onnx_graph_acts_like_the_policy(
    run_dir: Path, tmp_path: Path, algo: str, runner: object
) -> None:
    policy = _policy(run_dir, algo)
    path = export_onnx(policy, tmp_path / f"{algo}.onnx")
    onnx.checker.check_model(onnx.load(str(path)))
    obs, mask = _inputs(policy)
    action, scores = runner(path, obs, mask)  # type: ignore[operator]

    assert action.dtype == np.int64 and action.shape == (len(obs),)
    np.testing.assert_array_equal(action, policy.act(obs, mask))
    expected = policy.masked_scores(obs, mask)
    assert np.isneginf(scores[~mask]).all()
    np.testing.assert_allclose(scores[mask], expected[mask], rtol=1e-4, atol=1e-4)
    # Any batch size, down to one observation.
    one, _ = runner(path, obs[:1], mask[:1])  # type: ignore[operator]
    np.testing.assert_array_equal(one, policy.act(obs[:1], mask[:1]))


def test_onnx_metadata_names_the_actions(run_dir: Path, tmp_path: Path) -> None:
    policy = _policy(run_dir, "cql")
    model = onnx.load(str(export_onnx(policy, tmp_path / "p.onnx")))
    meta = {p.key: p.value for p in model.metadata_props}
    assert meta["algo"] == "cql"
    assert int(meta["observation_dim"]) == policy.observation_dim
    assert json.loads(meta["actions"]) == policy.actions.to_dict()
    assert meta["source_sha256"] == policy.manifest["sha256"]
    assert [i.name for i in model.graph.input] == ["obs", "mask"]
    assert [o.name for o in model.graph.output] == ["action", "scores"]


def _main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="addiffusion")
    register(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


def test_export_onnx_cli(run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "bc.onnx"
    policy = run_dir / "baselines" / "bc" / "policy.d3"
    assert _main(["offline-rl", "export-onnx", "--policy", str(policy), "--out", str(out)]) == 0
    assert f"wrote the bc policy to {out}" in capsys.readouterr().out
    obs, mask = _inputs(_policy(run_dir, "bc"))
    np.testing.assert_array_equal(
        _reference(out, obs, mask)[0], _policy(run_dir, "bc").act(obs, mask)
    )

    tampered = tmp_path / "policy.d3"
    tampered.write_bytes(policy.read_bytes() + b"x")
    (tmp_path / "manifest.json").write_bytes((policy.parent / "manifest.json").read_bytes())
    assert _main(["offline-rl", "export-onnx", "--policy", str(tampered)]) == 2
    assert "refusing to load" in capsys.readouterr().err
    assert not tampered.with_suffix(".onnx").exists()


def test_missing_onnx_package_is_explained(
    run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(ImportError, match="pip install onnx"):
        export_onnx(_policy(run_dir, "iql"), tmp_path / "p.onnx")
