"""A manifest's ``allowed_actions`` and ``observation_drop`` (the ablations) in OfflinePolicy, its
plain-torch modules and its ONNX graph, for every algorithm. Policies are trained with d3rlpy
directly for a few steps on random data whose dropped parts are zero, as the training data of a
state ablation is; the manifests are written next to them (a manifest is not hashed)."""

from __future__ import annotations

import dataclasses
import hashlib
import json
from pathlib import Path
from typing import Any

import d3rlpy
import numpy as np
import pytest
import torch
from d3rlpy.algos import DiscreteBCConfig, DiscreteBCQConfig, DiscreteCQLConfig
from d3rlpy.constants import ActionSpace
from d3rlpy.dataset import MDPDataset
from d3rlpy.logging import NoopAdapterFactory
from d3rlpy.models.encoders import VectorEncoderFactory
from d3rlpy.preprocessing import StandardObservationScaler

from addiffusion.diffusion.actions import ActionTable
from addiffusion.diffusion.mdp import ObservationLayout, drop_parts
from addiffusion.offline_rl import trust
from addiffusion.offline_rl.discrete_iql import DiscreteIQLConfig
from addiffusion.offline_rl.policy import (
    D3RLPY_TYPES,
    MANIFEST_FORMAT,
    OfflinePolicy,
    PolicyLoadError,
    actor_logits_module,
    load_policy,
    read_manifest,
    scores_module,
)

torch.set_num_threads(1)
TABLE = ActionTable.build([1, 2, 4], 6, 1, refine_budget=1, refine_k=2)
"""jump-1, jump-2, jump-4, stop, refine."""
LAYOUT = ObservationLayout(4, 4, time_dim=4, quality_dim=3)
DROP = ["quality", "image_features"]
STOP_ONLY = ["jump-1", "stop"]
CONFIGS: dict[str, Any] = {
    "iql": DiscreteIQLConfig,
    "cql": DiscreteCQLConfig,
    "bc": DiscreteBCConfig,
    "bcq": DiscreteBCQConfig,
}


def _obs(n: int, seed: int) -> np.ndarray:
    return (np.random.default_rng(seed).normal(size=(n, LAYOUT.dim)) * 2 + 0.5).astype(np.float32)


def _manifest(algo: str, sha256: str, **extra: Any) -> dict[str, Any]:
    return {
        "format": MANIFEST_FORMAT,
        "algo": algo,
        "d3rlpy_type": D3RLPY_TYPES[algo],
        "sha256": sha256,
        "observation_dim": LAYOUT.dim,
        "observation": LAYOUT.to_dict(),
        "action_size": TABLE.n,
        "actions": TABLE.to_dict(),
        **extra,
    }


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """algo -> a folder with a trusted ``policy.d3`` trained on data without ``DROP``."""
    root = tmp_path_factory.mktemp("restrict")
    n = 200
    rng = np.random.default_rng(0)
    obs = drop_parts(_obs(n, 0), LAYOUT, DROP)
    buffer = MDPDataset(
        observations=obs,
        actions=rng.integers(0, TABLE.n, n),
        rewards=rng.normal(size=(n, 1)).astype(np.float32),
        terminals=(np.arange(n) % 5 == 4).astype(np.float32),
        action_space=ActionSpace.DISCRETE,
        action_size=TABLE.n,
    )
    out = {}
    for algo, cls in CONFIGS.items():
        encoders = {
            f.name: VectorEncoderFactory([16])
            for f in dataclasses.fields(cls)
            if f.name.endswith("encoder_factory")
        }
        scaler = StandardObservationScaler(mean=obs.mean(0), std=obs.std(0))
        d3rlpy.seed(0)
        model = cls(batch_size=32, observation_scaler=scaler, **encoders).create(device="cpu:0")
        model.fit(
            buffer,
            n_steps=10,
            n_steps_per_epoch=10,
            logger_adapter=NoopAdapterFactory(),
            show_progress=False,
        )
        folder = root / algo
        folder.mkdir()
        model.save(str(folder / "policy.d3"))
        sha256 = hashlib.sha256((folder / "policy.d3").read_bytes()).hexdigest()
        trust.record(folder / "policy.d3", sha256, "test")
        (folder / "manifest.json").write_text(json.dumps(_manifest(algo, sha256)))
        out[algo] = folder
    return out


def _load(folder: Path, tmp_path: Path, **extra: Any) -> OfflinePolicy:
    """The policy of ``folder`` under its manifest plus ``extra``."""
    base = json.loads((folder / "manifest.json").read_text())
    path = tmp_path / f"{folder.name}-manifest.json"
    path.write_text(json.dumps({**base, **extra}))
    return load_policy(folder / "policy.d3", path)


def _graph_actions(policy: OfflinePolicy, obs: np.ndarray, mask: np.ndarray, tmp: Path) -> Any:
    pytest.importorskip("onnx")
    from onnx.reference import ReferenceEvaluator

    from addiffusion.offline_rl.onnx_export import export_onnx

    path = export_onnx(policy, tmp / f"{policy.algo_name}.onnx")
    return ReferenceEvaluator(str(path)).run(None, {"obs": obs, "mask": mask})[0]


# onnx's reference LogSoftmax takes log(0) for a sharp imitator (onnxruntime does not).
@pytest.mark.filterwarnings("ignore:divide by zero encountered in log:RuntimeWarning")
@pytest.mark.parametrize("algo", list(CONFIGS))
def test_disallowed_actions_are_never_taken(
    runs: dict[str, Path], tmp_path: Path, algo: str
) -> None:
    policy = _load(runs[algo], tmp_path, allowed_actions=["stop", "jump-1"])
    assert policy.allowed_actions == ("jump-1", "stop")  # table order
    np.testing.assert_array_equal(policy.allowed, [True, False, False, True, False])
    obs = _obs(400, 1)
    everything = np.ones((len(obs), TABLE.n), dtype=bool)
    scores = policy.scores(obs)
    # Unrestricted, the highest score is often a disallowed action...
    assert (~policy.allowed[scores.argmax(axis=1)]).any()
    # ...but it is never taken: the best allowed action is.
    actions = policy.act(obs, everything)
    assert policy.allowed[actions].all()
    np.testing.assert_array_equal(actions, np.where(policy.allowed, scores, -np.inf).argmax(axis=1))
    assert np.isneginf(policy.masked_scores(obs, everything)[:, ~policy.allowed]).all()
    assert (policy.action_probs(obs, everything)[:, ~policy.allowed] == 0).all()
    np.testing.assert_allclose(policy.action_probs(obs, everything).sum(axis=1), 1.0, rtol=1e-5)
    # A row whose legal actions are all disallowed keeps its own mask (refine only here).
    mask = everything.copy()
    mask[:10] = False
    mask[:10, TABLE.refine] = True
    actions = policy.act(obs, mask)
    assert (actions[:10] == TABLE.refine).all() and policy.allowed[actions[10:]].all()
    np.testing.assert_array_equal(_graph_actions(policy, obs, mask, tmp_path), actions)


def test_all_actions_allowed_is_no_restriction(runs: dict[str, Path], tmp_path: Path) -> None:
    everything = _load(runs["bc"], tmp_path, allowed_actions=list(TABLE.names))
    unrestricted = _load(runs["bc"], tmp_path, allowed_actions=None)
    assert unrestricted.allowed_actions is None and unrestricted.allowed.all()
    obs = _obs(50, 2)
    mask = np.ones((50, TABLE.n), dtype=bool)
    np.testing.assert_array_equal(everything.act(obs, mask), unrestricted.act(obs, mask))


@pytest.mark.parametrize(
    ("extra", "match"),
    [
        ({"allowed_actions": ["jump-1", "jump-3"]}, r"'allowed_actions': unknown action 'jump-3'"),
        ({"allowed_actions": "stop"}, r"'allowed_actions' must be a non-empty list"),
        ({"allowed_actions": []}, r"'allowed_actions' must be a non-empty list"),
        ({"allowed_actions": ["stop", "stop"]}, r"'allowed_actions' names an action twice"),
        ({"observation_drop": ["colour"]}, r"'observation_drop': unknown observation part"),
        ({"observation_drop": "time"}, r"'observation_drop' must be a list"),
        ({"observation_drop": ["time"], "observation": None}, r"no 'observation' entry"),
        ({"observation": {"image_dim": 4}}, r"'observation' is not an observation layout"),
        (
            {"observation": ObservationLayout(8, 8).to_dict()},
            rf"'observation' has dim {ObservationLayout(8, 8).dim}, but observation_dim",
        ),
    ],
)
def test_bad_restrictions_are_refused_by_name(
    runs: dict[str, Path], tmp_path: Path, extra: dict[str, Any], match: str
) -> None:
    base = json.loads((runs["bc"] / "manifest.json").read_text())
    path = tmp_path / "manifest.json"
    path.write_text(json.dumps({**base, **extra}))
    with pytest.raises(PolicyLoadError, match=match) as err:
        read_manifest(path)
    assert str(path) in str(err.value)
    with pytest.raises(PolicyLoadError, match=match):
        load_policy(runs["bc"] / "policy.d3", path)
    algo = load_policy(runs["bc"] / "policy.d3").algo
    with pytest.raises(PolicyLoadError, match=match):
        OfflinePolicy(algo, {**base, **extra})


@pytest.mark.parametrize("algo", list(CONFIGS))
def test_dropped_parts_are_ignored(runs: dict[str, Path], tmp_path: Path, algo: str) -> None:
    policy = _load(runs[algo], tmp_path, observation_drop=DROP)
    plain = _load(runs[algo], tmp_path)  # the same networks, no drop
    assert policy.observation_drop == ("image_features", "quality")  # OBSERVATION_PARTS order
    keep = LAYOUT.keep_mask(DROP)
    np.testing.assert_array_equal(policy.keep_columns, keep)
    obs = _obs(300, 3)
    other = obs.copy()
    other[:, ~keep] = np.random.default_rng(4).normal(size=(300, int((~keep).sum()))) * 5
    scores = policy.scores(obs)
    np.testing.assert_array_equal(policy.scores(other), scores)
    np.testing.assert_array_equal(scores, plain.scores(drop_parts(obs, LAYOUT, DROP)))
    assert not np.array_equal(plain.scores(obs), scores)  # the columns do matter unzeroed
    # The plain-torch module (standardisation folded, dropped columns zeroed) on raw inputs.
    with torch.no_grad():
        ours = scores_module(policy)(torch.from_numpy(other)).numpy()
    np.testing.assert_allclose(ours, scores, rtol=1e-4, atol=1e-4)
    if algo in ("iql", "bc"):
        first = actor_logits_module(policy)[0]
        assert isinstance(first, torch.nn.Linear)
        assert (first.weight[:, torch.from_numpy(~keep)] == 0).all()
    rng = np.random.default_rng(5)
    mask = rng.random((300, TABLE.n)) < 0.5
    mask[np.arange(300), rng.integers(0, TABLE.n, 300)] = True
    np.testing.assert_array_equal(
        _graph_actions(policy, other, mask, tmp_path), policy.act(obs, mask)
    )
