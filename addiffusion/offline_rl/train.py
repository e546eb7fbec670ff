"""Train the configured offline algorithm (and baselines) on d3rlpy replay buffers.

Output folder of one run (``out_dir``)::

    policy.d3          d3rlpy checkpoint (``algo.save``) after the last step: config, weights,
                       optimizer states; its sha256 is also added to the user's trust store
                       (``offline_rl.trust``), outside this folder, so that ``load_policy`` will
                       unpickle it
    manifest.json      algo, seed, step, sha256 of policy.d3, observation dim and layout, action
                       size, the action table (``actions``: ActionTable.to_dict()), the actions
                       the policy may take (``allowed_actions``) and the observation parts it
                       sees as zeros (``observation_drop``), the observations' decoder
                       (``observer``), config, checkpoint folders, metrics
    checkpoints/<step>/policy.d3 + manifest.json
                       the policy after each earlier epoch (trusted like policy.d3)
    ope.json           FQE (d3rlpy DiscreteFQE, validation split) of every checkpoint and the
                       final policy (``offline_rl.fqe``; absent without validation data)
    metrics.json       final losses, validation metrics, stop-decision evaluation, the final
                       policy's FQE (+ baselines, + other seeds)
    training.csv       one row per epoch: losses and validation metrics (for ``dvc plots``)
    logs/<algo>/       d3rlpy's FileAdapter log (params.json, one CSV per metric)
    baselines/<name>/  the same files for each baseline in ``cfg.baselines`` (folder always made)
    seeds/<seed>/      the same tree for each seed of ``cfg.seeds`` after the first (folder
                       always made)
"""

from __future__ import annotations

import csv
import dataclasses
import json
import shutil
import warnings
from pathlib import Path
from typing import Any

import d3rlpy
import numpy as np
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
from addiffusion.diffusion.mdp import ObservationLayout
from addiffusion.offline_rl import trust
from addiffusion.offline_rl.config import ALGORITHMS, OfflineRLConfig
from addiffusion.offline_rl.policy import (
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
    cfg: OfflineRLConfig, algo: str, scaler: StandardObservationScaler | None
) -> QLearningAlgoBase[Any, Any]:
    """The d3rlpy algorithm ``algo`` (a key of :data:`ALGORITHMS`) built from its params
    sub-section as it is, every encoder an MLP of ``cfg.hidden_units`` (ReLU)."""
    cls = ALGORITHMS[algo].config_class()
    enc = VectorEncoderFactory(hidden_units=list(cfg.hidden_units), activation="relu")
    encoders = {f.name: enc for f in dataclasses.fields(cls) if f.name.endswith("encoder_factory")}
    config = cls(**cfg.settings(algo), **encoders, observation_scaler=scaler)
    return config.create(device=resolve_device(cfg.device))


def _evaluators(
    algo: str, val: ReplayBuffer | None, table: ActionTable
) -> dict[str, EvaluatorProtocol]:
    if val is None or not val.episodes:
        return {}
    evaluators: dict[str, EvaluatorProtocol] = {
        "val_action_match": DiscreteActionMatchEvaluator(val.episodes)
    }
    if ALGORITHMS[algo].has_q:  # BC has no Q function
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


def _save_trusted(algo: QLearningAlgoBase[Any, Any], path: Path, source: str) -> str:
    """``algo.save(path)``, its sha256 recorded in the trust store; returns the sha256."""
    path.parent.mkdir(parents=True, exist_ok=True)
    algo.save(str(path))
    sha256 = sha256_file(path)
    try:
        trust.record(path, sha256, source)
    except trust.TrustStoreError as e:
        # The run's result stays usable: under `dvc repro`, dvc.lock vouches for it too.
        warnings.warn(
            f"{e}; {path} will load only where dvc.lock records it, or once trusted "
            f"with `addiffusion offline-rl trust {path}`",
            stacklevel=2,
        )
    return sha256


def _train_one(
    train: ReplayBuffer,
    val: ReplayBuffer | None,
    cfg: OfflineRLConfig,
    out_dir: Path,
    log: bool,
    show_progress: bool,
    table: ActionTable,
    observer: dict[str, str] | None,
    layout: ObservationLayout | None,
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
    shutil.rmtree(out_dir / "checkpoints", ignore_errors=True)
    (out_dir / "checkpoints").mkdir()
    n_epochs = cfg.n_steps // cfg.n_steps_per_epoch
    source = f"offline-rl train ({cfg.algo}, seed {cfg.seed})"
    history: list[tuple[int, dict[str, float]]] = []
    checkpoints: list[dict[str, Any]] = []
    for epoch, epoch_metrics in algo.fitter(
        train,
        n_steps=n_epochs * cfg.n_steps_per_epoch,
        n_steps_per_epoch=cfg.n_steps_per_epoch,
        experiment_name=cfg.algo,
        with_timestamp=False,
        logger_adapter=adapter,
        show_progress=show_progress,
        save_interval=n_epochs + 1,  # d3rlpy's own model_*.d3 files: never (ours are below)
        evaluators=_evaluators(cfg.algo, val, table),
    ):
        history.append((epoch, epoch_metrics))
        if epoch < n_epochs:
            # Every epoch but the last (that one is policy.d3): checkpoints/<step>/ holds a
            # policy.d3 whose manifest (written below) is the run's with its own sha256.
            step = epoch * cfg.n_steps_per_epoch
            where = out_dir / "checkpoints" / str(step) / "policy.d3"
            checkpoints.append({"step": step, "sha256": _save_trusted(algo, where, source)})
    policy_path = out_dir / "policy.d3"
    sha256 = _save_trusted(algo, policy_path, source)
    _write_curve(out_dir / "training.csv", history)

    final = history[-1][1]
    manifest: dict[str, Any] = {
        "format": MANIFEST_FORMAT,
        "algo": cfg.algo,
        "d3rlpy_type": ALGORITHMS[cfg.algo].d3rlpy_type,
        "d3rlpy_version": d3rlpy.__version__,
        "policy_file": policy_path.name,
        "sha256": sha256,
        "step": n_epochs * cfg.n_steps_per_epoch,
        "seed": cfg.seed,
        "observation_dim": obs_dim,
        "observation": layout.to_dict() if layout is not None else None,
        "observation_drop": list(cfg.drop_observations),
        "action_size": table.n,
        "actions": table.to_dict(),
        "allowed_actions": [
            name
            for name, ok in zip(table.names, table.allowed(cfg.action_space), strict=True)
            if ok
        ],
        "observer": observer,
        "actor": {
            "hidden_units": list(cfg.hidden_units),
            "activation": "relu",
            "observation_scaler": cfg.observation_scaler,
        },
        "config": cfg.to_dict(),
        "checkpoints": [f"checkpoints/{c['step']}" for c in checkpoints],
        "data": {
            "train_episodes": len(train.episodes),
            "train_transitions": int(train.transition_count),
            "val_episodes": len(val.episodes) if val is not None else 0,
            "val_transitions": int(val.transition_count) if val is not None else 0,
        },
    }
    for c in checkpoints:
        folder = out_dir / "checkpoints" / str(c["step"])
        entry = {**manifest, "sha256": c["sha256"], "step": c["step"], "checkpoints": []}
        (folder / "manifest.json").write_text(json.dumps(entry, indent=2) + "\n")
    policy = OfflinePolicy(algo, manifest)
    metrics: dict[str, Any] = {
        "algo": cfg.algo,
        "seed": cfg.seed,
        "n_steps": n_epochs * cfg.n_steps_per_epoch,
        "losses": {k: float(v) for k, v in final.items() if not k.startswith(("time_", "val_"))},
        "val": {k[4:]: float(v) for k, v in final.items() if k.startswith("val_")},
    }
    train_stops = evaluate_stops(policy.act, train.episodes, table)
    metrics["train_stop"] = train_stops.to_dict() if train_stops else None
    val_stops = evaluate_stops(policy.act, val.episodes, table) if val is not None else None
    metrics["val"]["stop"] = val_stops.to_dict() if val_stops else None
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    metrics["fqe"] = _fqe_run(out_dir, cfg, val)  # loads the run through its manifest
    manifest["metrics"] = metrics
    (out_dir / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    return metrics


def _fqe_run(
    out_dir: Path, cfg: OfflineRLConfig, val: ReplayBuffer | None
) -> dict[str, Any] | None:
    """FQE of the run's checkpoints and final policy on ``val`` (:func:`ope.fqe_points`),
    written to ``out_dir/ope.json``; returns the final policy's entry (None: no FQE)."""
    from addiffusion.offline_rl.ope import FQESettings, fqe_points, trajectory_starts

    path = out_dir / "ope.json"
    path.unlink(missing_ok=True)
    if cfg.fqe.n_steps == 0 or val is None or not trajectory_starts(val):
        return None
    settings = FQESettings(
        n_steps=cfg.fqe.n_steps,
        batch_size=cfg.fqe.batch_size,
        learning_rate=cfg.fqe.learning_rate,
        target_update_interval=cfg.fqe.target_update_interval,
        gamma=cfg.gamma(cfg.algo),
        hidden_units=list(cfg.hidden_units),
        seed=cfg.seed,
        device=cfg.device,
    )
    report = fqe_points(out_dir, val, settings)
    path.write_text(json.dumps(report, indent=2) + "\n")
    return report["points"][-1]


def train_offline(
    train: ReplayBuffer,
    val: ReplayBuffer | None,
    cfg: OfflineRLConfig,
    out_dir: Path,
    *,
    actions: ActionTable,
    observer: dict[str, str] | None = None,
    layout: ObservationLayout | None = None,
    log: bool = True,
    show_progress: bool = False,
) -> dict[str, Any]:
    """Train ``cfg.algo`` and each baseline, once per seed of ``cfg.seeds``.

    Buffers: d3rlpy ReplayBuffers with ``ActionSpace.DISCRETE``, ``action_size=actions.n`` (the
    dataset's action table, recorded in the manifest as ``actions``) and flat float32
    observations (B, D), converted with the config's ablations
    (``to_replay_buffers(..., allowed=actions.allowed(cfg.action_space),
    drop=cfg.drop_observations)``; the manifest records both, and ``layout``, the dataset's
    observation layout, which ``drop_observations`` needs). ``observer``: which decoder produced
    the observations (:attr:`addiffusion.task.Task.observer`), recorded in the manifest so that
    evaluation can refuse the policy on observations of another decoder.

    The first seed writes the files listed in the module docstring under ``out_dir``, each
    further seed the same tree under ``out_dir/seeds/<seed>/``. Returns the content of
    ``out_dir/metrics.json`` (baselines under ``"baselines"``, other seeds' metrics under
    ``"seeds"``). ``log=False`` uses d3rlpy's NoopAdapter (no ``logs/`` folder).
    """
    out_dir = Path(out_dir)
    obs_dim = check_buffer(train, "train", actions)
    if cfg.drop_observations and layout is None:
        raise ValueError(
            "offline_rl.drop_observations needs the dataset's observation layout (layout=)"
        )
    if val is not None and val.episodes and check_buffer(val, "val", actions) != obs_dim:
        raise ValueError(
            f"val observations have dim {check_buffer(val, 'val', actions)}, train ones {obs_dim}"
        )
    # Always present (maybe empty), so a pipeline can declare it as an output.
    shutil.rmtree(out_dir / "seeds", ignore_errors=True)
    (out_dir / "seeds").mkdir(parents=True)
    runs = {}
    for seed in cfg.seeds:
        run_dir = out_dir if seed == cfg.seeds[0] else out_dir / "seeds" / str(seed)
        run_cfg = cfg.with_seed(seed)
        summary = _train_one(
            train, val, run_cfg, run_dir, log, show_progress, actions, observer, layout
        )
        (run_dir / "baselines").mkdir(exist_ok=True)
        if cfg.baselines:
            summary["baselines"] = {
                name: _train_one(
                    train,
                    val,
                    run_cfg.with_algo(name),
                    run_dir / "baselines" / name,
                    log,
                    show_progress,
                    actions,
                    observer,
                    layout,
                )
                for name in cfg.baselines
            }
            (run_dir / "metrics.json").write_text(json.dumps(summary, indent=2) + "\n")
        runs[seed] = summary
    first = runs[cfg.seeds[0]]
    if len(cfg.seeds) > 1:
        first["seeds"] = {str(seed): runs[seed] for seed in cfg.seeds[1:]}
        (out_dir / "metrics.json").write_text(json.dumps(first, indent=2) + "\n")
    return first
