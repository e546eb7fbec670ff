"""Fixed-schedule frontier, hindsight oracle and frontier-relative comparison of adaptive methods.

Every method runs the same N held-out items (an item is a ``(prompt_id, seed)`` pair) in the same
order, so per-item scores of two methods are paired. A *fixed schedule* (a solver run for k steps,
``nfe == k`` on every item) is a :class:`FixedRun`.

- :func:`fixed_frontier`: the best mean score reachable by a fixed schedule at or below each NFE.
- :func:`frontier_items`: the (all-solver) frontier at any mean NFE, per item: between two
  frontier points it is the expected score of running schedule ``a`` with probability ``1 - w``
  and schedule ``b`` with probability ``w``, so the linear interpolation is achievable at that
  mean NFE and the per-item pairing with a policy is kept.
- :func:`oracle_items` / :func:`oracle_curve`: the per-item hindsight limit (each item picks its
  own best fixed schedule), the ceiling no per-item stopping rule over these schedules can beat.
- :func:`compare_to_frontier`: a policy's gain over the frontier at its mean NFE, with a
  prompt-cluster paired bootstrap interval (same convention as
  :func:`addiffusion.eval.metrics.paired_bootstrap`: prompts are resampled with all their seeds).

Pure numpy except :func:`plot_frontier`, which writes a PNG with matplotlib (Agg).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np


@dataclass(frozen=True)
class FixedRun:
    """One fixed schedule's per-item results: ``solver`` run for ``k`` steps (``nfe == k``)."""

    name: str
    solver: str
    k: int
    scores: np.ndarray  # (N,)


@dataclass(frozen=True)
class FrontierPoint:
    nfe: float
    score: float
    name: str  # the fixed schedule achieving ``score`` (its own k may be below ``nfe``)


# ----------------------------------------------------------------------------- validation


def _check_runs(runs: Sequence[FixedRun]) -> int:
    """Validate the fixed runs; return the number of items N."""
    if len(runs) == 0:
        raise ValueError("no fixed runs given")
    n: int | None = None
    first = ""
    seen: set[str] = set()
    for r in runs:
        if r.name in seen:
            raise ValueError(f"duplicate fixed run name {r.name!r}")
        seen.add(r.name)
        s = np.asarray(r.scores)
        if s.ndim != 1:
            raise ValueError(f"fixed run {r.name!r}: scores must be 1-D, got shape {s.shape}")
        if len(s) == 0:
            raise ValueError(f"fixed run {r.name!r}: no items")
        if not np.all(np.isfinite(s)):
            raise ValueError(f"fixed run {r.name!r}: scores contain nan or inf")
        if int(r.k) < 1:
            raise ValueError(f"fixed run {r.name!r}: k must be >= 1, got {r.k}")
        if n is None:
            n, first = len(s), r.name
        elif len(s) != n:
            raise ValueError(
                f"fixed run {r.name!r} has {len(s)} items but {first!r} has {n}: "
                "all methods must run the same items"
            )
    assert n is not None
    return n


def _sorted_runs(runs: Sequence[FixedRun]) -> list[FixedRun]:
    """Runs by k ascending (stable: input order among equal k)."""
    return sorted(runs, key=lambda r: int(r.k))


def _stack(runs: Sequence[FixedRun]) -> tuple[np.ndarray, np.ndarray]:
    """(R,) k and (R, N) scores of runs already sorted by k."""
    ks = np.array([float(r.k) for r in runs])
    scores = np.stack([np.asarray(r.scores, np.float64) for r in runs])
    return ks, scores


# ----------------------------------------------------------------------------- frontier


def fixed_frontier(runs: Sequence[FixedRun], solver: str | None = None) -> list[FrontierPoint]:
    """The fixed-schedule frontier: for each NFE k present (runs of ``solver``, or all solvers
    when None), the best mean score of any fixed schedule at or below that NFE (monotone
    non-decreasing), with the name of the schedule achieving it (ties: the cheaper schedule,
    then the earlier one in ``runs``)."""
    _check_runs(runs)
    if solver is not None:
        chosen = [r for r in runs if r.solver == solver]
        if not chosen:
            solvers = sorted({r.solver for r in runs})
            raise ValueError(f"no fixed runs of solver {solver!r} (have {solvers})")
    else:
        chosen = list(runs)
    points: list[FrontierPoint] = []
    best_score, best_name = -math.inf, ""
    srt = _sorted_runs(chosen)
    i = 0
    while i < len(srt):
        k = int(srt[i].k)
        while i < len(srt) and int(srt[i].k) == k:
            m = float(np.mean(np.asarray(srt[i].scores, np.float64)))
            if m > best_score:
                best_score, best_name = m, srt[i].name
            i += 1
        points.append(FrontierPoint(nfe=float(k), score=best_score, name=best_name))
    return points


def frontier_items(runs: Sequence[FixedRun], nfe: float) -> tuple[np.ndarray, str]:
    """Per-item scores of the all-solver frontier interpolated at mean NFE ``nfe``.

    With frontier points ``a`` (``nfe_a <= nfe``) and ``b`` (``nfe_b >= nfe``) bracketing ``nfe``
    and ``w = (nfe - nfe_a) / (nfe_b - nfe_a)``: ``(1 - w) * scores_a + w * scores_b`` per item,
    where ``scores_a`` / ``scores_b`` are those of the schedules achieving the two points; label
    ``'ddim-4..ddim-8 (w=0.25)'`` (just the name when ``nfe`` is on a point or both points are
    achieved by the same schedule). Below the cheapest point: that point's scores; above the most
    expensive: the best schedule's scores (both said in the label).
    """
    _check_runs(runs)
    if not math.isfinite(nfe):
        raise ValueError(f"nfe must be finite, got {nfe}")
    by_name = {r.name: np.asarray(r.scores, np.float64) for r in runs}
    pts = fixed_frontier(runs)
    if nfe < pts[0].nfe:
        p = pts[0]
        return by_name[p.name].copy(), f"{p.name} (below cheapest nfe={p.nfe:g})"
    if nfe > pts[-1].nfe:
        p = pts[-1]
        return by_name[p.name].copy(), f"{p.name} (above most expensive nfe={p.nfe:g}: best)"
    nfes = np.array([p.nfe for p in pts])
    ia = int(np.searchsorted(nfes, nfe, side="right")) - 1  # last with nfe_a <= nfe
    a = pts[ia]
    if a.nfe == nfe:
        return by_name[a.name].copy(), a.name
    b = pts[ia + 1]  # first with nfe_b > nfe (exists: nfe < pts[-1].nfe here)
    w = (nfe - a.nfe) / (b.nfe - a.nfe)
    if a.name == b.name:
        return by_name[a.name].copy(), a.name
    items = (1.0 - w) * by_name[a.name] + w * by_name[b.name]
    return items, f"{a.name}..{b.name} (w={w:.2f})"


# ----------------------------------------------------------------------------- oracle


def _pick(ks: np.ndarray, scores: np.ndarray, lam: float) -> np.ndarray:
    """Per item, the index of the run maximising ``score - lam * nfe`` (ties: the cheaper run;
    ``ks`` ascending so the first maximum is the cheapest)."""
    obj = scores - lam * ks[:, None]
    best = obj.max(axis=0)
    # Relative slack for rounding at exact breakpoints (lam = slope between two runs); exact at 0.
    tol = 1e-9 * lam * float(ks.max())
    return np.argmax(obj >= best[None, :] - tol, axis=0)


def oracle_items(runs: Sequence[FixedRun]) -> tuple[np.ndarray, np.ndarray]:
    """Oracle in hindsight: per item, the cheapest fixed schedule (any solver) that reaches the
    item's best score over all fixed schedules. Returns ``(nfe (N,), score (N,))``."""
    _check_runs(runs)
    ks, scores = _stack(_sorted_runs(runs))
    idx = _pick(ks, scores, 0.0)
    cols = np.arange(scores.shape[1])
    return ks[idx], scores[idx, cols]


def _group_sums(scores: np.ndarray, groups: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
    """(R, G) score sums and (G,) item counts per group (``None``: every item its own group)."""
    if groups is None:
        return scores, np.ones(scores.shape[1])
    groups = np.asarray(groups)
    if groups.shape != (scores.shape[1],):
        raise ValueError(
            f"groups has shape {groups.shape} but the fixed runs have {scores.shape[1]} items"
        )
    _, inverse = np.unique(groups, return_inverse=True)
    n_groups = int(inverse.max()) + 1
    sums = np.stack([np.bincount(inverse, weights=row, minlength=n_groups) for row in scores])
    return sums, np.bincount(inverse, minlength=n_groups).astype(np.float64)


def oracle_curve(
    runs: Sequence[FixedRun], n_lambdas: int = 200, groups: np.ndarray | None = None
) -> list[tuple[float, float]]:
    """The hindsight limit of choosing a fixed schedule per item (or per group of items) as a
    mean-NFE vs mean-score curve.

    For ``lambda`` swept from large (everything takes the cheapest schedule) to 0 (the oracle),
    each item picks the fixed schedule maximising ``score - lambda * nfe`` (ties: cheaper). With
    ``groups`` (``(N,)`` labels) all items of a group must take the same schedule, chosen on the
    group's mean score: ``groups = category`` is the limit of a policy that knows only the prompt's
    type, ``groups = prompt id`` that of one that knows the prompt but not the seed; ``None`` (every
    item alone) is the per-item oracle. The lambdas are the breakpoints (slopes between two
    schedules of one group), all of them when there are at most ``n_lambdas``, else ``n_lambdas``
    quantiles of them. Returns the distinct points ``(mean nfe, mean score)`` sorted by nfe,
    ending at the oracle point.
    """
    n = _check_runs(runs)
    ks, item_scores = _stack(_sorted_runs(runs))
    sums, counts = _group_sums(item_scores, groups)
    means = sums / counts[None, :]
    cols = np.arange(means.shape[1])
    pts: set[tuple[float, float]] = set()
    for lam in _lambdas(ks, means, n_lambdas):
        idx = _pick(ks, means, float(lam))
        pts.add((float((ks[idx] * counts).sum() / n), float(sums[idx, cols].sum() / n)))
    curve = sorted(pts)
    # Keep only the upper-left envelope: a point is dropped if an earlier (cheaper or equal) one
    # scores at least as well (cannot happen for exact breakpoints; guards rounding).
    out: list[tuple[float, float]] = []
    for x, y in curve:
        while out and out[-1][0] == x:
            out.pop()
        if out and out[-1][1] >= y:
            continue
        out.append((x, y))
    return out


def _lambdas(ks: np.ndarray, means: np.ndarray, n_lambdas: int) -> np.ndarray:
    """NFE prices to sweep, from one that makes every group take the cheapest schedule down to 0:
    the breakpoints (positive slopes between two schedules of one group of ``means`` (R, G)), at
    most ``n_lambdas`` of them (quantiles when there are more)."""
    if n_lambdas < 1:
        raise ValueError(f"n_lambdas must be >= 1, got {n_lambdas}")
    dk = ks[None, :] - ks[:, None]  # (R, R): k_j - k_i
    upper = dk > 0
    slopes = ((means[None, :, :] - means[:, None, :]) / np.where(upper, dk, 1.0)[:, :, None])[
        upper
    ].ravel()
    slopes = np.unique(slopes[slopes > 0])
    if len(slopes) > n_lambdas:
        slopes = np.unique(np.quantile(slopes, np.linspace(0.0, 1.0, n_lambdas)))
    gaps = np.diff(np.unique(ks))
    span = float(means.max() - means.min())
    lam_max = (span / float(gaps.min()) if len(gaps) else 0.0) * 2.0 + 1.0
    return np.concatenate([[lam_max], slopes[::-1], [0.0]])


def heldout_seed_curve(
    runs: Sequence[FixedRun], groups: np.ndarray, folds: np.ndarray, n_lambdas: int = 200
) -> list[tuple[float, float]]:
    """The honest counterpart of :func:`oracle_curve` with ``groups``: each group's schedule is
    chosen on its items of one fold (e.g. ``folds`` = the seed's index within its prompt) and
    scored on its items of the other folds, every fold in turn, so a choice is never scored on
    the seeds it was picked on. In-sample, picking the best of many schedules on a couple of
    seeds per prompt rewards luck; here luck does not carry over to the held-out seeds.

    Returns the points ``(mean nfe, mean score)`` over all held-out scorings, sorted by nfe (not
    an envelope: a cross-fitted choice can cost more and score less). Needs at least two folds.
    """
    n = _check_runs(runs)
    groups, folds = np.asarray(groups), np.asarray(folds)
    for what, arr in (("groups", groups), ("folds", folds)):
        if arr.shape != (n,):
            raise ValueError(f"{what} has shape {arr.shape} but the fixed runs have {n} items")
    fold_keys = np.unique(folds)
    if len(fold_keys) < 2:
        raise ValueError(f"a held-out-seed curve needs at least 2 folds, got {len(fold_keys)}")
    ks, scores = _stack(_sorted_runs(runs))
    _, g_of = np.unique(groups, return_inverse=True)
    sums, counts = _group_sums(scores, groups)
    fits = []  # per fold: (R, G) mean scores of its items; the other folds' items to score
    for f in fold_keys:
        fit = folds == f
        f_sums, f_counts = _group_sums(scores[:, fit], g_of[fit])
        f_means = np.zeros_like(sums)
        f_means[:, np.unique(g_of[fit])] = f_sums / f_counts[None, :]
        has = np.zeros(sums.shape[1], bool)
        has[g_of[fit]] = True
        fits.append((f_means, np.flatnonzero(~fit & has[g_of])))
    pts: set[tuple[float, float]] = set()
    for lam in _lambdas(ks, sums / counts[None, :], n_lambdas):
        nfe = score = used = 0.0
        for f_means, test in fits:
            j = _pick(ks, f_means, float(lam))[g_of[test]]
            nfe += float(ks[j].sum())
            score += float(scores[j, test].sum())
            used += len(test)
        pts.add((nfe / used, score / used))
    return sorted(pts)


@dataclass(frozen=True)
class Headroom:
    """How far an oracle curve rises above the all-solver fixed frontier."""

    max_gain: float  # max over the curve's points of (curve score - frontier at that NFE)
    nfe: float  # the mean NFE of that point
    score: float  # its mean score


def headroom(curve: Sequence[tuple[float, float]], runs: Sequence[FixedRun]) -> Headroom:
    """The largest gain of an :func:`oracle_curve` over the interpolated all-solver frontier
    (:func:`frontier_items`) at the same mean NFE: what a policy choosing among these fixed
    schedules could at most gain, for the kind of knowledge the curve's grouping stands for."""
    best = Headroom(-math.inf, float("nan"), float("nan"))
    for x, y in curve:
        gain = y - float(frontier_items(runs, x)[0].mean())
        if gain > best.max_gain:
            best = Headroom(gain, x, y)
    return best


def oracle_nfe_at(curve: Sequence[tuple[float, float]], score: float) -> float:
    """Mean NFE the oracle curve needs to reach mean ``score`` (linear interpolation between its
    points); the cheapest point's NFE below its score, nan above the oracle's score."""
    if len(curve) == 0:
        raise ValueError("empty oracle curve")
    if not math.isfinite(score):
        return float("nan")
    xs = np.array([c[0] for c in curve], np.float64)
    ys = np.array([c[1] for c in curve], np.float64)
    if score > ys.max():
        return float("nan")
    if score <= ys[0]:
        return float(xs[0])
    j = int(np.argmax(ys >= score))  # first point reaching it (ys sorted by xs, increasing)
    if ys[j] == score:
        return float(xs[j])
    x0, y0, x1, y1 = xs[j - 1], ys[j - 1], xs[j], ys[j]
    return float(x0 + (score - y0) / (y1 - y0) * (x1 - x0))


def cheapest_fixed_nfe(runs: Sequence[FixedRun], score: float) -> float:
    """NFE of the cheapest fixed schedule whose mean score is at least ``score`` (nan if none)."""
    _check_runs(runs)
    ks = [float(r.k) for r in runs if float(np.mean(np.asarray(r.scores, np.float64))) >= score]
    return min(ks) if ks else float("nan")


# ----------------------------------------------------------------------------- comparison


def _fmt(x: float, digits: int) -> str:
    return "nan" if not math.isfinite(x) else f"{x:.{digits}f}"


@dataclass(frozen=True)
class FrontierComparison:
    method: str
    nfe: float  # policy mean NFE
    score: float  # policy mean score
    frontier: float  # mean score of the interpolated all-solver frontier at ``nfe``
    gain: float  # score - frontier
    ci: tuple[float, float]  # prompt-cluster paired bootstrap interval of the gain
    nfe_ratio: float  # nfe / NFE of the cheapest fixed schedule reaching ``score``
    oracle_ratio: float  # nfe / NFE the hindsight oracle needs for ``score``
    frontier_label: str
    metric: str = "verifier"

    def line(self, metric: str | None = None) -> str:
        """``'frontier: method=<m> nfe=<x> verifier=<y> frontier=<z> gain=<y-z> ci=[<lo>,<hi>]
        nfe_ratio=<r> oracle_ratio=<o>'``: 3 decimals (nfe 2); nan printed as ``nan``."""
        name = self.metric if metric is None else metric
        return (
            f"frontier: method={self.method} nfe={_fmt(self.nfe, 2)} "
            f"{name}={_fmt(self.score, 3)} frontier={_fmt(self.frontier, 3)} "
            f"gain={_fmt(self.gain, 3)} ci=[{_fmt(self.ci[0], 3)},{_fmt(self.ci[1], 3)}] "
            f"nfe_ratio={_fmt(self.nfe_ratio, 3)} oracle_ratio={_fmt(self.oracle_ratio, 3)}"
        )


def _cluster_bootstrap(
    diff: np.ndarray, groups: np.ndarray, n_boot: int, confidence: float, seed: int
) -> tuple[float, float]:
    """Percentile interval of mean(diff), resampling groups (prompts) with replacement."""
    keys, inverse = np.unique(groups, return_inverse=True)
    sums = np.bincount(inverse, weights=diff, minlength=len(keys))
    counts = np.bincount(inverse, minlength=len(keys)).astype(np.float64)
    rng = np.random.default_rng(seed)
    pick = rng.integers(0, len(keys), size=(n_boot, len(keys)))
    boot = sums[pick].sum(axis=1) / counts[pick].sum(axis=1)
    alpha = (1.0 - confidence) / 2.0
    lo, hi = np.quantile(boot, [alpha, 1.0 - alpha])
    return float(lo), float(hi)


def compare_to_frontier(
    method: str,
    nfe: np.ndarray,
    scores: np.ndarray,
    runs: Sequence[FixedRun],
    prompt_ids: np.ndarray,
    n_boot: int = 2000,
    confidence: float = 0.95,
    seed: int = 0,
    metric: str = "verifier",
) -> FrontierComparison:
    """A policy's per-item ``(nfe, scores)`` vs the all-solver frontier interpolated at the
    policy's mean NFE.

    gain = mean(scores) - mean(frontier items); ci from a prompt-level (cluster) paired bootstrap
    of ``scores - frontier items`` (prompts resampled with replacement, seeds kept together);
    nfe_ratio = mean nfe / :func:`cheapest_fixed_nfe` at the mean score; oracle_ratio = mean nfe /
    :func:`oracle_nfe_at` (:func:`oracle_curve`) at the mean score (nan where unreachable).
    """
    n = _check_runs(runs)
    nfe = np.asarray(nfe, np.float64)
    scores = np.asarray(scores, np.float64)
    prompt_ids = np.asarray(prompt_ids)
    for what, arr in (("nfe", nfe), ("scores", scores), ("prompt_ids", prompt_ids)):
        if arr.ndim != 1 or len(arr) != n:
            raise ValueError(
                f"{method!r}: {what} has shape {arr.shape} but the fixed runs have {n} items"
            )
    if not (np.all(np.isfinite(nfe)) and np.all(np.isfinite(scores))):
        raise ValueError(f"{method!r}: nfe or scores contain nan or inf")
    if not 0.0 < confidence < 1.0:
        raise ValueError(f"confidence must be in (0, 1), got {confidence}")
    if n_boot < 1:
        raise ValueError(f"n_boot must be >= 1, got {n_boot}")
    mean_nfe = float(nfe.mean())
    mean_score = float(scores.mean())
    f_items, label = frontier_items(runs, mean_nfe)
    frontier = float(f_items.mean())
    ci = _cluster_bootstrap(scores - f_items, prompt_ids, n_boot, confidence, seed)
    cheapest = cheapest_fixed_nfe(runs, mean_score)
    oracle = oracle_nfe_at(oracle_curve(runs), mean_score)
    return FrontierComparison(
        method=method,
        nfe=mean_nfe,
        score=mean_score,
        frontier=frontier,
        gain=mean_score - frontier,
        ci=ci,
        nfe_ratio=mean_nfe / cheapest if math.isfinite(cheapest) else float("nan"),
        oracle_ratio=mean_nfe / oracle if math.isfinite(oracle) and oracle > 0 else float("nan"),
        frontier_label=label,
        metric=metric,
    )


def best_learned(comparisons: Sequence[FrontierComparison]) -> FrontierComparison:
    """The comparison with the highest gain (nan gains rank last; ties: the first)."""
    if len(comparisons) == 0:
        raise ValueError("no comparisons given")
    return max(comparisons, key=lambda c: c.gain if math.isfinite(c.gain) else -math.inf)


# ----------------------------------------------------------------------------- plot


def plot_frontier(
    path: str | Path,
    runs: Sequence[FixedRun],
    points: Mapping[str, tuple[float, float]],
    policies: Sequence[str],
    metric: str = "verifier",
    curves: Mapping[str, Sequence[tuple[float, float]]] | None = None,
) -> None:
    """Pareto plot: a frontier step line per solver, the bold all-solver frontier (linear between
    its points, as :func:`frontier_items` interpolates), every fixed run as a small marker, the
    oracle curve (dashed) and point, ``points`` (name -> (mean nfe, mean score)) as labelled
    markers with ``policies`` (also in ``points``) highlighted, and ``curves`` (label -> points,
    e.g. the per-category and per-prompt oracle curves) as dotted lines. x = mean NFE per image."""
    _check_runs(runs)
    missing = [p for p in policies if p not in points]
    if missing:
        raise ValueError(f"policies {missing} have no entry in points")
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7.0, 4.8))
    cmap = plt.get_cmap("tab10")
    solvers = sorted({r.solver for r in runs})
    for i, solver in enumerate(solvers):
        color = cmap(i % 10)
        front = fixed_frontier(runs, solver)
        ax.step(
            [p.nfe for p in front],
            [p.score for p in front],
            where="post",
            color=color,
            alpha=0.8,
            linewidth=1.2,
            label=f"{solver} frontier",
        )
        mine = [r for r in runs if r.solver == solver]
        ax.plot(
            [r.k for r in mine],
            [float(np.mean(r.scores)) for r in mine],
            "o",
            color=color,
            markersize=3.5,
            alpha=0.9,
        )
    front = fixed_frontier(runs)
    ax.plot(
        [p.nfe for p in front],
        [p.score for p in front],
        "-",
        color="black",
        linewidth=2.6,
        label="fixed frontier (all solvers)",
    )
    curve = oracle_curve(runs)
    ax.plot(
        [c[0] for c in curve], [c[1] for c in curve], "--", color="0.35", label="oracle (hindsight)"
    )
    ax.plot(*curve[-1], "D", color="0.35", markersize=7, label="oracle point")
    for i, (label, extra) in enumerate((curves or {}).items()):
        ax.plot(
            [c[0] for c in extra],
            [c[1] for c in extra],
            ":",
            color=cmap((len(solvers) + i) % 10),
            linewidth=1.6,
            label=label,
        )
    pol = set(policies)
    for name, (x, y) in points.items():
        if name in pol:
            ax.plot(x, y, "*", color="crimson", markersize=15, markeredgecolor="black", zorder=5)
            ax.annotate(
                name,
                (x, y),
                fontsize=8,
                fontweight="bold",
                color="crimson",
                xytext=(5, 5),
                textcoords="offset points",
            )
        else:
            ax.plot(x, y, "s", markerfacecolor="none", markeredgecolor="tab:blue", markersize=7)
            ax.annotate(name, (x, y), fontsize=7, xytext=(4, -10), textcoords="offset points")
    ax.set_xlabel("mean NFE per image")
    ax.set_ylabel(f"mean {metric.replace('_', ' ')}")
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    fig.tight_layout()
    fig.savefig(Path(path), dpi=120)
    plt.close(fig)
