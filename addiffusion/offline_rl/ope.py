"""Off-policy evaluation of a trained offline policy with d3rlpy's Fitted Q Evaluation.

FQE (Le et al. 2019, https://arxiv.org/abs/1903.08738) fits ``Q^pi`` of a *fixed* policy ``pi``
on logged transitions by regression to ``r + gamma * Q'(s', pi(s'))`` (``Q'`` a target network
synced every ``target_update_interval`` steps). Its value at the episodes' first states,
``E_{s0}[Q(s0, pi(s0))]``, estimates the return the policy would get: a number comparable across
algorithms, unlike each algorithm's own (pessimistic or expectile) Q values.

``pi(s)`` is the d3rlpy algorithm's greedy action (``predict``), without the action mask: the
mask needs the step counters, not the observation. States where the mask binds (the last grid
point, warm-up) are where the behaviour data has only the legal actions, so an unmasked policy
that picks an illegal one there is valued by extrapolation.

The offline_rl stage runs :func:`fqe_points` on every run it trains (``ope.json`` beside each
policy); ``addiffusion offline-rl fqe`` re-runs it with other settings.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import d3rlpy
import numpy as np
from d3rlpy.dataset import EpisodeBase, ReplayBuffer
from d3rlpy.logging import NoopAdapterFactory
from d3rlpy.metrics import AverageValueEstimationEvaluator, InitialStateValueEstimationEvaluator
from d3rlpy.models.encoders import VectorEncoderFactory
from d3rlpy.ope import DiscreteFQE, FQEConfig

from addiffusion.offline_rl.train import resolve_device


@dataclass(frozen=True)
class FQESettings:
    """Knobs of one FQE fit (command-line flags of ``offline-rl fqe``; no params.yaml section)."""

    n_steps: int = 2000
    """Gradient steps of the Q regression."""
    batch_size: int = 256
    learning_rate: float = 1e-3
    """Adam learning rate of the Q network."""
    gamma: float = 0.99
    """Discount: use the one the policy was trained with (its manifest's ``config.gamma``)."""
    target_update_interval: int = 100
    """Gradient steps between hard syncs of the target Q network."""
    hidden_units: list[int] = field(default_factory=lambda: [128, 128])
    """Hidden layer widths of the Q MLP (ReLU): by default the policy's."""
    seed: int = 0
    device: str = "cpu"
    """auto, cpu, cuda or cuda:N (as offline_rl.device)."""

    def __post_init__(self) -> None:
        for name in ("n_steps", "batch_size", "target_update_interval"):
            value = getattr(self, name)
            if value < 1:
                raise ValueError(f"fqe {name} must be >= 1, got {value}")
        if not 0.0 < self.gamma <= 1.0:
            raise ValueError(f"fqe gamma must be in (0, 1], got {self.gamma}")
        if self.learning_rate <= 0.0:
            raise ValueError(f"fqe learning_rate must be > 0, got {self.learning_rate}")
        if not self.hidden_units or min(self.hidden_units) < 1:
            raise ValueError(
                f"fqe hidden_units must be a non-empty list of widths >= 1, got {self.hidden_units}"
            )
        if self.seed < 0:
            raise ValueError(f"fqe seed must be >= 0, got {self.seed}")


def trajectory_starts(buffer: ReplayBuffer) -> list[EpisodeBase]:
    """Episodes of more than one step: recorded paths (roots and branches). The one-step
    counterfactual stops are not episode starts (the same rule as the training evaluators)."""
    return [ep for ep in buffer.episodes if ep.size() > 1]


def discounted_return(episode: EpisodeBase, gamma: float) -> float:
    """``sum_t gamma^t r_t`` of a logged episode from its first step."""
    rewards = np.asarray(episode.rewards, dtype=np.float64).reshape(-1)
    return float(np.sum(rewards * gamma ** np.arange(rewards.size)))


def fqe_estimate(
    algo: Any,
    fit: ReplayBuffer,
    settings: FQESettings,
    evaluate: ReplayBuffer | None = None,
) -> dict[str, Any]:
    """Fit DiscreteFQE for ``algo``'s greedy policy on ``fit`` and value it on ``evaluate``
    (default: ``fit``).

    ``algo``: a built d3rlpy Q-learning algorithm (``OfflinePolicy.algo``): FQE calls its
    ``impl.predict_best_action`` (targets, on observations scaled by ``algo.observation_scaler``,
    which FQE shares) and ``predict`` (evaluation, raw observations). Buffers: discrete
    actions, flat float32 observations (B, D). Returns (values in reward units, discounted by
    ``settings.gamma``)::

        initial_value      FQE's mean Q(s0, pi(s0)) over ``evaluate``'s trajectory starts
        average_value      FQE's mean Q(s, pi(s)) over every state of ``evaluate``
        behaviour_return   mean observed discounted return of those trajectories (the logged
                           behaviour, for reference)
        n_start_episodes, n_fit_transitions, final_loss, settings
    """
    evaluate = fit if evaluate is None else evaluate
    starts = trajectory_starts(evaluate)
    if not starts:
        raise ValueError("the evaluation buffer has no trajectory of more than one step")
    d3rlpy.seed(settings.seed)
    # FQE hands the *scaled* next observations of a batch to ``algo.impl``, which expects them
    # scaled by the algorithm's own scaler: FQE must use exactly that scaler (or none).
    config = FQEConfig(
        learning_rate=settings.learning_rate,
        batch_size=settings.batch_size,
        gamma=settings.gamma,
        target_update_interval=settings.target_update_interval,
        encoder_factory=VectorEncoderFactory(
            hidden_units=list(settings.hidden_units), activation="relu"
        ),
        observation_scaler=algo.observation_scaler,
    )
    fqe = DiscreteFQE(algo=algo, config=config, device=resolve_device(settings.device))
    history = fqe.fit(
        fit,
        n_steps=settings.n_steps,
        n_steps_per_epoch=settings.n_steps,
        experiment_name="fqe",
        with_timestamp=False,
        logger_adapter=NoopAdapterFactory(),
        show_progress=False,
        save_interval=2,  # one epoch: never save a checkpoint
    )
    returns = [discounted_return(ep, settings.gamma) for ep in starts]
    return {
        "initial_value": InitialStateValueEstimationEvaluator(starts)(fqe, evaluate),
        "average_value": AverageValueEstimationEvaluator(evaluate.episodes)(fqe, evaluate),
        "behaviour_return": float(np.mean(returns)),
        "n_start_episodes": len(starts),
        "n_fit_transitions": int(fit.transition_count),
        "final_loss": float(history[-1][1].get("loss", math.nan)),
        "settings": asdict(settings),
    }


def fqe_points(run_dir: Path, evaluate: ReplayBuffer, settings: FQESettings) -> dict[str, Any]:
    """FQE of every checkpoint of an ``offline-rl train`` run folder and of its final policy,
    each fitted and valued on ``evaluate`` (the validation split), in training order.

    Each policy is loaded through the trusted loader (:func:`load_policy`). Returns
    ``{"method", "fit_on", "settings", "behaviour_return", "points": [{"step", "path",
    "initial_value", "average_value", ...}, ...]}``, the final policy last (``path`` ".").
    """
    from addiffusion.offline_rl.policy import load_policy

    run_dir = Path(run_dir)
    manifest = json.loads((run_dir / "manifest.json").read_text())
    folders = [*manifest.get("checkpoints", []), "."]
    points = []
    for rel in folders:
        folder = run_dir / rel
        policy = load_policy(folder / "policy.d3", folder / "manifest.json")
        estimate = fqe_estimate(policy.algo, evaluate, settings, evaluate=evaluate)
        points.append({"step": int(policy.manifest["step"]), "path": rel, **estimate})
    return {
        "method": "d3rlpy DiscreteFQE",
        "fit_on": "val",
        "algo": manifest["algo"],
        "seed": manifest.get("seed"),
        "behaviour_return": points[-1]["behaviour_return"],
        "points": points,
    }
