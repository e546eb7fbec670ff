"""Train the configured offline algorithm (and baselines) on d3rlpy replay buffers.

Output folder of one run (``out_dir``)::

    policy.d3          d3rlpy checkpoint (``algo.save``): config, weights, optimizer states; its
                       sha256 is also added to the user's trust store (``offline_rl.trust``),
                       outside this folder, so that ``load_policy`` will unpickle it
    manifest.json      algo, sha256 of policy.d3, observation dim, action size, the action table
                       (``actions``: ActionTable.to_dict()), the observations' decoder
                       (``observer``), config, metrics
    metrics.json       final losses, validation metrics, stop-decision evaluation (+ baselines)
    training.csv       one row per epoch: losses and validation metrics (for ``dvc plots``)
    logs/<algo>/       d3rlpy's FileAdapter log (params.json, one CSV per metric)
    baselines/<name>/  the same files for each baseline in ``cfg.baselines`` (folder always made)
"""

from __future__ import annotations

import csv
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import d3rlpy
import numpy as np
from d3rlpy.algos import DiscreteBCConfig, DiscreteCQLConfig
from d3rlpy.algos.qlearning.base import QLearningAlgoBase
from d3rlpy.constants import ActionSpace
from d3rlpy.dataset import ReplayBuffer
from d3rlpy.logging import FileAdapterFactory, LoggerAdapterFactory, NoopAdapterFactory
from d3rlpy.metrics import (
    DiscreteActionMatchEvaluator,
    EvaluatorProtocol,
    InitialStateValueEstimationEvaluator,
    TDErrorEvaluator,
)
from d3rlpy.models.encoders import VectorEncoderFactory
from d3rlpy.preprocessing import StandardObservationScaler

from addiffusion.datasets.store import sha256_file
from addiffusion.diffusion.actions import ActionTable
from addiffusion.offline_rl import trust
from addiffusion.offline_rl.config import Algo, OfflineRLConfig
from addiffusion.offline_rl.discrete_iql import DiscreteIQLConfig
from addiffusion.offline_rl.policy import (
    D3RLPY_TYPES,
    MANIFEST_FORMAT,
    OfflinePolicy,
)
from addiffusion.offline_rl.stop_eval import evaluate_stops


def resolve_device(device: str) -> str:
    """``auto`` -> ``cuda:0`` if available else ``cpu:0``; ``cpu``/``cuda`` -> index 0."""
    import torch

    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu:0"
    return {"cpu": "cpu:0", "cuda": "cuda:0"}.get(device, device)


def check_buffer(buffer: ReplayBuffer, name: str, table: ActionTable) -> int:
    """Check a buffer holds our MDP's data (discrete, ``table.n`` actions); returns the
    observation dim."""
    info = buffer.dataset_info
    if info.action_space != ActionSpace.DISCRETE:
        raise ValueError(f"{name} buffer must have action_space=DISCRETE, got {info.action_space}")
    if info.action_size != table.n:
        raise ValueError(
            f"{name} buffer must have action_size={table.n} (the dataset's action table: "
            f"{', '.join(table.names)}), got {info.action_size}"
        )
    if not buffer.episodes:
        raise ValueError(f"{name} buffer has no episodes")
    shape = buffer.episodes[0].observation_signature.shape
    if len(shape) != 1 or len(shape[0]) != 1:
        raise ValueError(f"{name} buffer must hold flat vector observations, got shapes {shape}")
    return int(shape[0][0])


def standard_scaler(train: ReplayBuffer) -> StandardObservationScaler:
    """Mean/std of the training observations, computed in one numpy pass (d3rlpy's own fit loops
    over transitions in Python)."""
    obs = np.concatenate([np.asarray(ep.observations, dtype=np.float64) for ep in train.episodes])
    return StandardObservationScaler(mean=obs.mean(axis=0), std=obs.std(axis=0))


def make_algo(
    cfg: OfflineRLConfig, algo: Algo, scaler: StandardObservationScaler | None
) -> QLearningAlgoBase[Any, Any]:
    """The d3rlpy algorithm for ``algo`` with every MLP ``hidden_units`` wide, ReLU."""
    enc = VectorEncoderFactory(hidden_units=list(cfg.hidden_units), activation="relu")
    device = resolve_device(cfg.device)
    if algo == "iql":
        return DiscreteIQLConfig(
            batch_size=cfg.batch_size,
            gamma=cfg.gamma,
            actor_learning_rate=cfg.actor_learning_rate,
            critic_learning_rate=cfg.critic_learning_rate,
            actor_encoder_factory=enc,
            critic_encoder_factory=enc,
            value_encoder_factory=enc,
            tau=cfg.tau,
            n_critics=cfg.n_critics,
            expectile=cfg.expectile,
            weight_temp=cfg.beta,
            max_weight=cfg.max_weight,
            observation_scaler=scaler,
        ).create(device=device)
    if algo == "cql":
        return DiscreteCQLConfig(
            batch_size=cfg.batch_size,
            gamma=cfg.gamma,
            learning_rate=cfg.critic_learning_rate,
            encoder_factory=enc,
            n_critics=cfg.n_critics,
            target_update_interval=cfg.cql_target_update_interval,
            alpha=cfg.cql_alpha,
            observation_scaler=scaler,
        ).create(device=device)
    if algo == "bc":
        return DiscreteBCConfig(
            batch_size=cfg.batch_size,
            learning_rate=cfg.actor_learning_rate,
            encoder_factory=enc,
            beta=cfg.bc_beta,
            observation_scaler=scaler,
        ).create(device=device)
    raise ValueError(f"offline_rl.algo must be one of iql, cql, bc, got {algo!r}")


def _evaluators(
    algo: Algo, val: ReplayBuffer | None, table: ActionTable
) -> dict[str, EvaluatorProtocol]:
    if val is None or not val.episodes:
        return {}
    evaluators: dict[str, EvaluatorProtocol] = {
        "val_action_match": DiscreteActionMatchEvaluator(val.episodes)
    }
    if algo != "bc":  # BC has no Q function
        evaluators["val_td_error"] = TDErrorEvaluator(val.episodes)
        # Trajectories only (one-step counterfactual stops are not episode starts); branches
        # start at their parent's state, a state of the MDP too.
        starts = [ep for ep in val.episodes if ep.size() > 1]
        if starts:
            evaluators["val_initial_value"] = InitialStateValueEstimationEvaluator(starts)
    return evaluators


def _write_curve(path: Path, history: list[tuple[int, dict[str, float]]]) -> None:
    names = sorted({k for _, m in history for k in m if not k.startswith("time_")})
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["epoch", *names])
        for epoch, m in history:
            w.writerow([epoch, *(m.get(k, "") for k in names)])


def _train_one(
    train: ReplayBuffer,
    val: ReplayBuffer | None,
    cfg: OfflineRLConfig,
    out_dir: Path,
    log: bool,
    show_progress: bool,
    table: ActionTable,
    observer: dict[str, str] | None,
) -> dict[str, Any]:
    obs_dim = check_buffer(train, "train", table)
    d3rlpy.seed(cfg.seed)
    out_dir.mkdir(parents=True, exist_ok=True)
    scaler = standard_scaler(train) if cfg.observation_scaler == "standard" else None
    algo = make_algo(cfg, cfg.algo, scaler)

    adapter: LoggerAdapterFactory = NoopAdapterFactory()
    if log:
        # d3rlpy appends to its CSVs: start the run's log folder afresh.
        shutil.rmtree(out_dir / "logs" / cfg.algo, ignore_errors=True)
        adapter = FileAdapterFactory(root_dir=str(out_dir / "logs"))
    n_epochs = cfg.n_steps // cfg.n_steps_per_epoch
    history = algo.fit(
        train,
        n_steps=n_epochs * cfg.n_steps_per_epoch,
        n_steps_per_epoch=cfg.n_steps_per_epoch,
        experiment_name=cfg.algo,
        with_timestamp=False,
        logger_adapter=adapter,
        show_progress=show_progress,
        save_interval=n_epochs + 1,  # the only checkpoint is policy.d3, whose hash is recorded
        evaluators=_evaluators(cfg.algo, val, table),
    )
    policy_path = out_dir / "policy.d3"
    algo.save(str(policy_path))
    sha256 = sha256_file(policy_path)
    try:
        trust.record(policy_path, sha256, f"offline-rl train ({cfg.algo})")
    except trust.TrustStoreError as e:
        # The run's result stays usable: under `dvc repro`, dvc.lock vouches for it too.
        warnings.warn(
            f"{e}; {policy_path} will load only where dvc.lock records it, or once trusted "
            f"with `addiffusion offline-rl trust {policy_path}`",
            stacklevel=2,
        )
    _write_curve(out_dir / "training.csv", history)

    final = history[-1][1]
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "algo": cfg.algo,
        "d3rlpy_type": D3RLPY_TYPES[cfg.algo],
        "d3rlpy_version": d3rlpy.__version__,
        "policy_file": policy_path.name,
        "sha256": sha256,
        "observation_dim": obs_dim,
        "action_size": table.n,
        "actions": table.to_dict(),
        "observer": observer,
        "actor": {
            "hidden_units": list(cfg.hidden_units),
            "activation": "relu",
            "observation_scaler": cfg.observation_scaler,
        },
        "config": cfg.to_dict(),
        "data": {
            "train_episodes": len(train.episodes),
            "train_transitions": int(train.transition_count),
            "val_episodes": len(val.episodes) if val is not None else 0,
            "val_transitions": int(val.transition_count) if val is not None else 0,
        },
    }
    policy = OfflinePolicy(algo, manifest)
    metrics: dict[str, Any] = {
        "algo": cfg.algo,
        "n_steps": n_epochs * cfg.n_steps_per_epoch,
        "losses": {k: float(v) for k, v in final.items() if not k.startswith(("time_", "val_"))},
        "val": {k[4:]: float(v) for k, v in final.items() if k.startswith("val_")},
    }
    train_stops = evaluate_stops(policy.act, train.episodes, table)
    metrics["train_stop"] = train_stops.to_dict() if train_stops else None
    val_stops = evaluate_stops(policy.act, val.episodes, table) if val is not None else None
    metrics["val"]["stop"] = val_stops.to_dict() if val_stops else None
    manifest["metrics"] = metrics
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def train_offline(
    train: ReplayBuffer,
    val: ReplayBuffer | None,
    cfg: OfflineRLConfig,
    out_dir: Path,
    *,
    actions: ActionTable,
    observer: dict[str, str] | None = None,
    log: bool = True,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Train ``cfg.algo`` on ``train`` (validation metrics on ``val``), then each baseline.

    Buffers: d3rlpy ReplayBuffers with ``ActionSpace.DISCRETE``, ``action_size=actions.n`` (the
    dataset's action table, recorded in the manifest as ``actions``) and flat float32
    observations (B, D). ``observer``: which decoder produced the observations
    (:attr:`addiffusion.task.Task.observer`), recorded in the manifest so that evaluation can
    refuse the policy on observations of another decoder. Writes the files listed in the module docstring under
    ``out_dir`` and returns the content of ``out_dir/metrics.json`` (baselines under
    ``"baselines"``). ``log=False`` uses d3rlpy's NoopAdapter (no ``logs/`` folder).
    """
    out_dir = Path(out_dir)
    obs_dim = check_buffer(train, "train", actions)
    if val is not None and val.episodes and check_buffer(val, "val", actions) != obs_dim:
        raise ValueError(
            f"val observations have dim {check_buffer(val, 'val', actions)}, train ones {obs_dim}"
        )
    summary = _train_one(train, val, cfg, out_dir, log, show_progress, actions, observer)
    # Always present (maybe empty), so a pipeline can declare it as an output.
    (out_dir / "baselines").mkdir(exist_ok=True)
    if cfg.baselines:
        summary["baselines"] = {
            name: _train_one(
                train,
                val,
                cfg.with_algo(name),
                out_dir / "baselines" / name,
                log,
                show_progress,
                actions,
                observer,
            )
            for name in cfg.baselines
        }
        (out_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary
