"""Discrete BCQ behind OfflinePolicy: d3rlpy's greedy rule, masks, its plain-torch module and its
ONNX graph. The policy is trained with d3rlpy directly (a few steps on random data) and its
imitator sharpened, so that the imitator's filter decides many actions."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import d3rlpy
import numpy as np
import pytest
import torch
from d3rlpy.algos import DiscreteBCQ, DiscreteBCQConfig
from d3rlpy.constants import ActionSpace
from d3rlpy.dataset import MDPDataset
from d3rlpy.logging import NoopAdapterFactory
from d3rlpy.models.encoders import VectorEncoderFactory
from d3rlpy.preprocessing import StandardObservationScaler

from addiffusion.diffusion.actions import ActionTable
from addiffusion.offline_rl import trust
from addiffusion.offline_rl.policy import (
    MANIFEST_FORMAT,
    OfflinePolicy,
    PolicyLoadError,
    actor_logits_module,
    load_policy,
    scores_module,
)
from addiffusion.policy.combine import BCQScores

torch.set_num_threads(1)
TABLE = ActionTable.build([1, 2, 4], 6, 1, refine_budget=1, refine_k=2)
"""jump-1, jump-2, jump-4, stop, refine."""
DIM = 10
FLEX = 0.3


def _obs(n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, DIM)) * 3 + 1).astype(np.float32)


@pytest.fixture(scope="module")
def run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, DiscreteBCQ]:
    """A trusted ``policy.d3`` + ``manifest.json`` of a DiscreteBCQ, and the algo itself."""
    root = tmp_path_factory.mktemp("bcq")
    n = 300
    rng = np.random.default_rng(0)
    obs = _obs(n, 0)
    buffer = MDPDataset(
        observations=obs,
        actions=rng.integers(0, TABLE.n, n),
        rewards=rng.normal(size=(n, 1)).astype(np.float32),
        terminals=(np.arange(n) % 5 == 4).astype(np.float32),
        action_space=ActionSpace.DISCRETE,
        action_size=TABLE.n,
    )
    d3rlpy.seed(0)
    algo = DiscreteBCQConfig(
        batch_size=32,
        n_critics=2,
        action_flexibility=FLEX,
        encoder_factory=VectorEncoderFactory([16, 16]),
        observation_scaler=StandardObservationScaler(mean=obs.mean(0), std=obs.std(0)),
    ).create(device="cpu:0")
    algo.fit(
        buffer,
        n_steps=20,
        n_steps_per_epoch=20,
        logger_adapter=NoopAdapterFactory(),
        show_progress=False,
    )
    assert algo.impl is not None
    with torch.no_grad():  # a confident imitator: its filter matters
        algo.impl.modules.imitator._fc.weight.mul_(6.0)
    path = root / "policy.d3"
    algo.save(str(path))
    sha256 = hashlib.sha256(path.read_bytes()).hexdigest()
    trust.record(path, sha256, "test")
    manifest = {
        "format": MANIFEST_FORMAT,
        "algo": "bcq",
        "d3rlpy_type": "discrete_bcq",
        "sha256": sha256,
        "observation_dim": DIM,
        "action_size": TABLE.n,
        "actions": TABLE.to_dict(),
    }
    (root / "manifest.json").write_text(json.dumps(manifest))
    return root, algo


def _masks(n: int, seed: int) -> np.ndarray:
    rng = np.random.default_rng(seed)
    mask = rng.random((n, TABLE.n)) < 0.4
    mask[np.arange(n), rng.integers(0, TABLE.n, n)] = True
    return mask


def test_act_is_d3rlpy_predict(run: tuple[Path, DiscreteBCQ]) -> None:
    root, algo = run
    policy = load_policy(root / "policy.d3")
    assert policy.algo_name == "bcq" and policy.action_flexibility == pytest.approx(FLEX)
    obs = _obs(1000, 1)
    everything = np.ones((len(obs), TABLE.n), dtype=bool)
    actions = policy.act(obs, everything)
    np.testing.assert_array_equal(actions, algo.predict(obs))
    np.testing.assert_array_equal(actions, policy.algo.predict(obs))
    # The imitator's filter decides: the best mean Q is often not the action taken.
    _, q = policy.bcq_parts(obs)
    assert 0.05 < (q.argmax(axis=1) != actions).mean() < 0.95


def test_masks_pick_the_best_kept_legal_action(run: tuple[Path, DiscreteBCQ]) -> None:
    policy = load_policy(run[0] / "policy.d3")
    obs, mask = _obs(1000, 2), _masks(1000, 3)
    log_probs, q = policy.bcq_parts(obs)
    kept = log_probs - log_probs.max(axis=1, keepdims=True) > np.log(FLEX)
    legal_kept = mask & kept
    expected = np.where(
        legal_kept.any(axis=1),
        np.where(legal_kept, q, -np.inf).argmax(axis=1),
        np.where(mask, q, -np.inf).argmax(axis=1),  # nothing legal is kept: the best legal Q
    )
    assert legal_kept.any(axis=1).any() and not legal_kept.any(axis=1).all()
    actions = policy.act(obs, mask)
    np.testing.assert_array_equal(actions, expected)
    scores = policy.masked_scores(obs, mask)
    assert np.isneginf(scores[~mask]).all() and np.isfinite(scores[mask]).all()
    probs = policy.action_probs(obs, mask)
    np.testing.assert_array_equal(probs, np.eye(TABLE.n, dtype=np.float32)[actions])


def test_scores_module_and_onnx_act_like_the_policy(
    run: tuple[Path, DiscreteBCQ], tmp_path: Path
) -> None:
    policy = load_policy(run[0] / "policy.d3")
    obs, mask = _obs(500, 4), _masks(500, 5)
    module = scores_module(policy)
    assert isinstance(module, BCQScores)
    with torch.no_grad():
        ours = module(torch.from_numpy(obs)).numpy()
    np.testing.assert_allclose(ours, policy.scores(obs), rtol=1e-4, atol=1e-4)
    ours_act = np.where(mask, ours, -np.inf).argmax(axis=1)
    np.testing.assert_array_equal(ours_act, policy.act(obs, mask))

    onnx = pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    from addiffusion.offline_rl.onnx_export import export_onnx

    path = export_onnx(policy, tmp_path / "bcq.onnx")
    meta = {p.key: p.value for p in onnx.load(str(path)).metadata_props}
    assert meta["algo"] == "bcq"
    action, scores = ReferenceEvaluator(str(path)).run(None, {"obs": obs, "mask": mask})
    np.testing.assert_array_equal(action, policy.act(obs, mask))
    np.testing.assert_allclose(scores[mask], policy.masked_scores(obs, mask)[mask], atol=1e-4)
    try:
        import onnxruntime
    except ImportError:
        return
    action, _ = onnxruntime.InferenceSession(str(path)).run(None, {"obs": obs, "mask": mask})
    np.testing.assert_array_equal(action, policy.act(obs, mask))


def test_bcq_has_no_actor_and_a_checked_type(run: tuple[Path, DiscreteBCQ], tmp_path: Path) -> None:
    root, algo = run
    policy = load_policy(root / "policy.d3")
    with pytest.raises(ValueError, match="needs a policy network"):
        actor_logits_module(policy)
    # A manifest that calls it another algorithm is refused before acting.
    (tmp_path / "policy.d3").write_bytes((root / "policy.d3").read_bytes())
    manifest = json.loads((root / "manifest.json").read_text())
    (tmp_path / "manifest.json").write_text(json.dumps({**manifest, "d3rlpy_type": "discrete_cql"}))
    with pytest.raises(PolicyLoadError, match="holds a 'discrete_bcq' model"):
        load_policy(tmp_path / "policy.d3")
    # bcq_parts is BCQ's alone.
    other = OfflinePolicy(algo, {**manifest, "algo": "cql"})
    with pytest.raises(ValueError, match="needs a bcq policy"):
        other.bcq_parts(_obs(2, 0))
