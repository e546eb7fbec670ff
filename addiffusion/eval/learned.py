"""Analyses of the learned policies that go beyond one method's row. Pure numpy.

* :func:`mean_ci`: a prompt-cluster bootstrap interval of one method's mean (its ``<m>_ci``);
* :func:`episode_return`: the MDP's return of a rolled-out image, up to a constant shared by all
  methods on the same items;
* :func:`checkpoint_report`: off-policy evaluation (FQE) against rollouts of every (policy,
  checkpoint): Spearman rank correlation, and checkpoint selection by FQE against selection by
  validation rollout (cross-fitted over two halves of the held-out prompts);
* :func:`seed_summary`: mean and spread of each algorithm over training seeds;
* :func:`pair_comparisons`: paired differences between two learned policies (PPO from IQL
  against IQL alone and against PPO from scratch).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from addiffusion.eval.metrics import paired_bootstrap
from addiffusion.rewards.config import RewardConfig

SEED_SEP = "@seed"
"""Method names of a further training seed: ``<name>@seed<s>`` (``iql@seed1``)."""


def base_name(method: str) -> str:
    """``iql@seed1`` -> ``iql``; other names unchanged."""
    return method.split(SEED_SEP, 1)[0]


def mean_ci(
    values: np.ndarray, groups: np.ndarray, n_samples: int, confidence: float, seed: int
) -> list[float]:
    """``[lo, hi]``: percentile bootstrap interval of the mean of ``values``, resampling prompts
    (``groups``) with all their seeds, like :func:`paired_bootstrap` (which it reuses with a
    zero baseline)."""
    v = np.asarray(values, np.float64)
    r = paired_bootstrap(
        v, np.zeros_like(v), groups, n_samples, confidence, np.random.default_rng(seed)
    )
    return [r["ci_low"], r["ci_high"]]


def episode_return(quality: np.ndarray, nfe: np.ndarray, cfg: RewardConfig) -> np.ndarray:
    """``(1 + terminal_bonus) * Q_final - c_nfe * NFE`` per image: the MDP's undiscounted return
    (:mod:`addiffusion.rewards.reward`: ``Q_j - Q_0 - c_nfe (NFE_j - NFE_0) + bonus Q_j``)
    without ``-Q_0 + c_nfe NFE_0``, which is the same for every method on the same (prompt,
    seed): differences and ranks between methods are the MDP's."""
    q = np.asarray(quality, np.float64)
    return (1.0 + cfg.terminal_bonus) * q - cfg.c_nfe * np.asarray(nfe, np.float64)


def spearman(x: Sequence[float], y: Sequence[float]) -> float:
    """Spearman's rank correlation (average ranks for ties); NaN below 3 points, without
    spread, or with a value that is not finite (as ``scipy.stats.spearmanr`` propagates NaN)."""
    a, b = np.asarray(x, np.float64), np.asarray(y, np.float64)
    if len(a) != len(b):
        raise ValueError(f"spearman needs paired values, got {len(a)} and {len(b)}")
    if len(a) < 3 or not (np.isfinite(a).all() and np.isfinite(b).all()):
        return float("nan")
    ra, rb = _ranks(a), _ranks(b)
    if ra.std() == 0 or rb.std() == 0:
        return float("nan")
    return float(np.corrcoef(ra, rb)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
    order = np.argsort(v, kind="stable")
    ranks = np.empty(len(v), np.float64)
    ranks[order] = np.arange(len(v), dtype=np.float64)
    for value in np.unique(v):  # ties: their average rank
        tie = v == value
        ranks[tie] = ranks[tie].mean()
    return ranks


@dataclass(frozen=True)
class CheckpointRun:
    """One (policy, checkpoint) on the held-out items: its per-item return and its FQE value."""

    method: str
    """The learned method it belongs to (``iql``, ``cql``, ...)."""
    step: int
    """Gradient steps it was trained for."""
    returns: np.ndarray
    """(N,) :func:`episode_return` of each held-out item."""
    nfe: float
    score: float
    """Mean of the evaluation metric (the verifier in the shapes world)."""
    fqe: float | None
    """FQE's value of the policy at the validation trajectories' first states (None: none; a
    value that is not finite, a diverged fit, counts as none)."""


def checkpoint_report(runs: Sequence[CheckpointRun], groups: np.ndarray) -> dict[str, Any]:
    """FQE against rollout over every (policy, checkpoint) with a (finite) FQE value.

    ``points``: one row per run (method, step, FQE, mean return, NFE, score). ``spearman``: rank
    correlation of FQE and mean rollout return over all points (``n_points``), and per method.
    ``selection``: per method, the checkpoint FQE picks (highest value) against the one a
    validation rollout picks (highest mean return on one half of the held-out prompts), each
    scored on the other half, both halves in turn (:func:`halves`): ``fqe_return``
    and ``rollout_return`` are the mean held-out returns of the two choices, ``regret`` their
    difference (rollout − FQE; 0 when FQE picks as well as a rollout), ``final_return`` that
    of simply taking the last checkpoint. With a single held-out prompt there are no halves:
    the returns of the selection are None.
    """
    with_fqe = [r for r in runs if r.fqe is not None and np.isfinite(r.fqe)]
    points = [
        {
            "method": r.method,
            "step": r.step,
            "fqe": r.fqe,
            "return": float(r.returns.mean()),
            "nfe": r.nfe,
            "score": r.score,
        }
        for r in runs
    ]
    report: dict[str, Any] = {
        "points": points,
        "n_points": len(with_fqe),
        "spearman": spearman([r.fqe for r in with_fqe], [r.returns.mean() for r in with_fqe]),
        "spearman_by_method": {},
        "selection": {},
    }
    folds = halves(groups)
    for method in dict.fromkeys(r.method for r in with_fqe):
        mine = sorted((r for r in with_fqe if r.method == method), key=lambda r: r.step)
        report["spearman_by_method"][method] = spearman(
            [r.fqe for r in mine], [r.returns.mean() for r in mine]
        )
        by_fqe = max(mine, key=lambda r: (r.fqe, r.step))
        picks_rollout, fqe_ret, roll_ret, final_ret = [], [], [], []
        for fold in (0, 1):
            pick_on, score_on = folds == fold, folds != fold
            if not pick_on.any() or not score_on.any():
                continue
            by_rollout = max(mine, key=lambda r: (r.returns[pick_on].mean(), r.step))
            picks_rollout.append(by_rollout.step)
            roll_ret.append(float(by_rollout.returns[score_on].mean()))
            fqe_ret.append(float(by_fqe.returns[score_on].mean()))
            final_ret.append(float(mine[-1].returns[score_on].mean()))
        report["selection"][method] = {
            "fqe_pick": by_fqe.step,
            "rollout_picks": picks_rollout,
            "fqe_return": float(np.mean(fqe_ret)) if fqe_ret else None,
            "rollout_return": float(np.mean(roll_ret)) if roll_ret else None,
            "final_return": float(np.mean(final_ret)) if final_ret else None,
            "regret": float(np.mean(roll_ret) - np.mean(fqe_ret)) if fqe_ret else None,
        }
    return report


def halves(groups: np.ndarray) -> np.ndarray:
    """``(N,)`` 0 or 1: the half of the held-out prompts each item's prompt (``groups``) is in,
    alternating over the prompts in id order (the parity of the prompt's rank, not of its id,
    so that both halves have prompts whatever ids were held out, e.g. only even ones)."""
    _, rank = np.unique(np.asarray(groups), return_inverse=True)
    return rank.reshape(-1) % 2


def seed_summary(metrics: Mapping[str, Mapping[str, Any]], metric: str) -> dict[str, Any]:
    """Mean and standard deviation over training seeds of each learned method that has more
    than one (``iql``, ``iql@seed1``, ...): ``{method: {"n_seeds", "methods", "nfe_mean",
    "nfe_std", "<metric>_mean", "<metric>_std", "gain_mean", "gain_std"}}``."""
    groups: dict[str, list[str]] = {}
    for name, m in metrics.items():
        if m.get("kind") == "policy":
            groups.setdefault(base_name(name), []).append(name)
    out: dict[str, Any] = {}
    for method, names in groups.items():
        if len(names) < 2:
            continue
        row: dict[str, Any] = {"n_seeds": len(names), "methods": names}
        values = {
            "nfe": [metrics[n]["nfe"] for n in names],
            metric: [metrics[n][metric] for n in names],
            "gain": [metrics[n]["frontier"]["gain"] for n in names],
        }
        for key, v in values.items():
            row[f"{key}_mean"] = float(np.mean(v))
            row[f"{key}_std"] = float(np.std(v, ddof=1))
        out[method] = row
    return out


def pair_comparisons(
    pairs: Sequence[tuple[str, str]],
    per_item: Mapping[str, Mapping[str, np.ndarray]],
    groups: np.ndarray,
    n_samples: int,
    confidence: float,
    seed: int,
) -> dict[str, Any]:
    """``"a - b"`` -> paired prompt-cluster bootstrap of every per-item value both methods have
    (``{"<value>": {"diff", "ci_low", "ci_high", "p"}}``); pairs with a missing method are left
    out."""
    out: dict[str, Any] = {}
    for a, b in pairs:
        if a not in per_item or b not in per_item:
            continue
        out[f"{a} - {b}"] = {
            key: paired_bootstrap(
                per_item[a][key],
                per_item[b][key],
                groups,
                n_samples,
                confidence,
                np.random.default_rng(seed),
            )
            for key in per_item[a]
            if key in per_item[b]
        }
    return out
