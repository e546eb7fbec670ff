"""Per-method summaries and paired comparisons. Pure numpy.

Every method runs the same (prompt, seed) pairs in the same order, so per-item differences between
two methods are paired. The bootstrap resamples *prompts* (each prompt's seeds stay together),
because images of one prompt are correlated and resampling them independently would make the
intervals too narrow.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

VERIFIER_PASS = 1.0 - 1e-6
"""A verifier score at least this high means every check of the caption passed (accuracy)."""


def _mean(x: np.ndarray) -> float:
    return float(np.mean(x)) if len(x) else float("nan")


def _std(x: np.ndarray) -> float:
    return float(np.std(x)) if len(x) else float("nan")


def summarize(
    nfe: np.ndarray, scores: Mapping[str, np.ndarray], categories: Sequence[str]
) -> dict[str, object]:
    """Mean NFE (± std) and mean of each score, overall and per category.

    nfe: (N,) int; scores: name -> (N,) float (clip_score, quality, verifier, ...);
    categories: (N,) complexity tier of each item.
    """
    cats = np.asarray(categories)
    out: dict[str, object] = {"n": int(len(nfe)), "nfe": _mean(nfe), "nfe_std": _std(nfe)}
    for name, v in scores.items():
        out[name] = _mean(v)
        out[f"{name}_std"] = _std(v)
    if "verifier" in scores:
        out["verifier_acc"] = _mean(np.asarray(scores["verifier"]) >= VERIFIER_PASS)
    by_cat: dict[str, dict[str, float]] = {}
    for cat in sorted(set(cats.tolist())):
        sel = cats == cat
        row = {"n": int(sel.sum()), "nfe": _mean(nfe[sel])}
        row.update({name: _mean(np.asarray(v)[sel]) for name, v in scores.items()})
        if "verifier" in scores:
            row["verifier_acc"] = _mean(np.asarray(scores["verifier"])[sel] >= VERIFIER_PASS)
        by_cat[cat] = row
    out["by_category"] = by_cat
    return out


def paired_bootstrap(
    a: np.ndarray,
    b: np.ndarray,
    groups: np.ndarray,
    n_samples: int,
    confidence: float,
    rng: np.random.Generator,
) -> dict[str, float]:
    """Mean of ``a - b`` with a prompt-cluster bootstrap interval and two-sided p-value.

    a, b: (N,) paired scores; groups: (N,) prompt id of each pair. Prompts are resampled with
    replacement (each with all its seeds); the p-value is twice the smaller tail mass of the
    bootstrap means around 0 (the percentile bootstrap's test of "no difference"), at least
    ``1 / n_samples``.
    """
    diff = np.asarray(a, np.float64) - np.asarray(b, np.float64)
    keys, inverse = np.unique(np.asarray(groups), return_inverse=True)
    sums = np.bincount(inverse, weights=diff, minlength=len(keys))
    counts = np.bincount(inverse, minlength=len(keys)).astype(np.float64)
    pick = rng.integers(0, len(keys), size=(n_samples, len(keys)))
    boot = sums[pick].sum(axis=1) / counts[pick].sum(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    p = 2.0 * min(float(np.mean(boot <= 0.0)), float(np.mean(boot >= 0.0)))
    # n_samples resamples cannot resolve p below 1 / n_samples: never report 0.
    p = min(max(p, 1.0 / n_samples), 1.0)
    return {"diff": float(diff.mean()), "ci_low": float(lo), "ci_high": float(hi), "p": p}


def closest_baseline(nfe: float, baselines: Mapping[str, float]) -> str:
    """The baseline whose mean NFE is closest to ``nfe`` (ties: the more expensive one, which is
    the stronger reference)."""
    if not baselines:
        raise ValueError("no fixed-step baselines to compare against")
    return min(baselines, key=lambda name: (abs(baselines[name] - nfe), -baselines[name]))


def compare(
    method: Mapping[str, np.ndarray],
    baseline: Mapping[str, np.ndarray],
    groups: np.ndarray,
    n_samples: int,
    confidence: float,
    seed: int,
) -> dict[str, float]:
    """Paired differences method - baseline for every score both have, flattened for
    ``dvc metrics``: ``{"nfe_diff", "clip_score_diff", "clip_score_ci_low", ..., "clip_score_p"}``.
    The rng is seeded per comparison so that adding a method does not move the others' intervals.
    """
    out: dict[str, float] = {}
    for name in method:
        if name not in baseline:
            continue
        rng = np.random.default_rng(seed)
        r = paired_bootstrap(method[name], baseline[name], groups, n_samples, confidence, rng)
        if name == "nfe":
            out["nfe_diff"] = r["diff"]
            continue
        out[f"{name}_diff"] = r["diff"]
        out[f"{name}_ci_low"] = r["ci_low"]
        out[f"{name}_ci_high"] = r["ci_high"]
        out[f"{name}_p"] = r["p"]
    return out
