"""Evaluation outputs: ``metrics.json`` (dvc metrics), ``pareto.csv`` (dvc plots), ``pareto.png``,
``samples.png`` and ``report.md``."""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only; no display on servers and CI
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

PARETO_COLUMNS = ("method", "kind", "nfe", "nfe_std", "clip_score", "quality", "verifier")
KINDS = ("baseline", "heuristic", "policy")


def _finite(x: Any) -> Any:
    """JSON has no NaN: write null instead (dvc and json.loads both read it)."""
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, dict):
        return {k: _finite(v) for k, v in x.items()}
    return x


def write_metrics(metrics: Mapping[str, Any], path: Path) -> None:
    path.write_text(json.dumps(_finite(dict(metrics)), indent=2, sort_keys=False) + "\n")


def write_pareto_csv(metrics: Mapping[str, Mapping[str, Any]], path: Path) -> None:
    """One row per method (``PARETO_COLUMNS``; ``verifier`` only when the dataset has it)."""
    columns = [
        c for c in PARETO_COLUMNS if c != "verifier" or any(c in m for m in metrics.values())
    ]
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(columns)
        for name, m in metrics.items():
            row = [name, m["kind"]] + [m.get(c, "") for c in columns[2:]]
            w.writerow(["" if isinstance(v, float) and not math.isfinite(v) else v for v in row])


def write_items(
    runs: Mapping[str, Any],
    scores: Mapping[str, Mapping[str, np.ndarray]],
    items: Sequence[Any],
    path: Path,
) -> None:
    """Per-item results (Parquet, one row per method x item): ``method, prompt_id, prompt,
    category, seed, nfe, stop_step`` and every score of ``scores[method]``. ``runs``: method ->
    :class:`addiffusion.eval.rollout.MethodRun`; ``items``: the evaluated
    :class:`addiffusion.eval.heldout.EvalItem` s, in the runs' order."""
    import polars as pl

    frames = []
    for name, run in runs.items():
        frames.append(
            pl.DataFrame(
                {
                    "method": [name] * len(items),
                    "prompt_id": [it.prompt_id for it in items],
                    "prompt": [it.prompt for it in items],
                    "category": [it.category for it in items],
                    "seed": [it.seed for it in items],
                    "nfe": np.asarray(run.nfe, np.int64),
                    "stop_step": np.asarray(run.stop_step, np.int64),
                    **{k: np.asarray(v, np.float64) for k, v in scores[name].items()},
                }
            )
        )
    pl.concat(frames, how="diagonal").write_parquet(path)


def plot_pareto(metrics: Mapping[str, Mapping[str, Any]], path: Path, n_max: int) -> None:
    """Quality vs mean NFE, one panel per score: baselines as a line, the rest as points."""
    scores = [
        s for s in ("clip_score", "quality", "verifier") if all(s in m for m in metrics.values())
    ]
    fig, axes = plt.subplots(1, len(scores), figsize=(4.6 * len(scores), 3.8), squeeze=False)
    for ax, score in zip(axes[0], scores, strict=True):
        base = sorted(
            ((m["nfe"], m[score], name) for name, m in metrics.items() if m["kind"] == "baseline")
        )
        if base:
            ax.plot(
                [b[0] for b in base], [b[1] for b in base], "-o", color="0.4", label="fixed steps"
            )
            for x, y, name in base:
                ax.annotate(name, (x, y), fontsize=7, xytext=(3, -9), textcoords="offset points")
        for kind, marker in (("heuristic", "s"), ("policy", "*")):
            for name, m in metrics.items():
                if m["kind"] != kind:
                    continue
                ax.errorbar(
                    m["nfe"],
                    m[score],
                    xerr=m.get("nfe_std", 0.0),
                    fmt=marker,
                    markersize=11 if kind == "policy" else 7,
                    capsize=2,
                    label=name,
                    markerfacecolor="none" if kind == "heuristic" else None,
                )
        ax.set_xlabel(f"mean NFE per image (n_max = {n_max})")
        ax.set_ylabel(score.replace("_", " "))
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    # Below the panels: inside, it would hide points.
    n_rows = math.ceil(len(labels) / 4)
    fig.legend(handles, labels, loc="lower center", ncol=4, fontsize=7, frameon=False)
    fig.tight_layout(rect=(0.0, 0.05 + 0.05 * n_rows, 1.0, 1.0))
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_samples(
    images: Mapping[str, np.ndarray], prompts: list[str], path: Path, n_cols: int = 8
) -> None:
    """A grid of final images: one row per method, the first ``n_cols`` (prompt, seed) pairs.

    images: method -> (N, H, W, 3) uint8. One composed array in one axes: a subplot per image
    costs seconds per figure.
    """
    names = list(images)
    n_cols = min(n_cols, len(prompts))
    h, w = next(iter(images.values())).shape[1:3]
    pad = max(1, h // 16)
    grid = np.full((len(names) * (h + pad), n_cols * (w + pad), 3), 255, np.uint8)
    for r, name in enumerate(names):
        for c in range(n_cols):
            y, x = r * (h + pad), c * (w + pad)
            grid[y : y + h, x : x + w] = images[name][c]
    scale = max(1.0, 64 / h)  # tiny 32-pixel images stay visible
    fig, ax = plt.subplots(
        figsize=(n_cols * scale * (w + pad) / 100 + 1.6, len(names) * scale * (h + pad) / 100 + 1.0)
    )
    ax.imshow(grid, interpolation="nearest")
    ax.set_yticks([r * (h + pad) + h / 2 for r in range(len(names))], names, fontsize=7)
    ax.set_xticks(
        [c * (w + pad) + w / 2 for c in range(n_cols)],
        [p[:20] for p in prompts[:n_cols]],
        fontsize=6,
        rotation=30,
        ha="right",
    )
    ax.tick_params(length=0)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _fmt(x: Any) -> str:
    if x is None:
        return "n/a"
    if isinstance(x, float):
        return "n/a" if not math.isfinite(x) else f"{x:.4f}"
    return str(x)


def write_report(
    metrics: Mapping[str, Mapping[str, Any]],
    context: Mapping[str, Any],
    path: Path,
    learned: Mapping[str, Any] | None = None,
) -> None:
    """A short markdown report: setup, the main table, paired comparisons, per-category table,
    and the learned policies' analyses (``learned``: FQE against rollout over checkpoints,
    pairs of learned methods, seeds)."""
    scores = [
        s
        for s in ("clip_score", "quality", "verifier", "verifier_acc")
        if all(s in m for m in metrics.values())
    ]
    lines = ["# Evaluation", ""]
    lines += [f"- {k}: {v}" for k, v in context.items()]
    lines += ["", "## Methods", ""]
    head = ["method", "kind", "NFE (± std)", *scores, "masked actions", "s / image"]
    lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in metrics.items():
        cells = [name, m["kind"], f"{m['nfe']:.2f} ± {m['nfe_std']:.2f}"]
        cells += [_fmt(m[s]) for s in scores]
        cells += [str(m.get("masked_actions", 0)), _fmt(m.get("seconds_per_image", ""))]
        lines.append("| " + " | ".join(cells) + " |")
    compared = {n: m for n, m in metrics.items() if "vs" in m}
    if compared:
        lines += ["", "## Paired comparison with the fixed-step baseline of closest NFE", ""]
        lines += [
            "Differences method − baseline on the same (prompt, seed) pairs; intervals from a "
            "prompt-cluster bootstrap.",
            "",
        ]
        lines += ["| method | vs | ΔNFE | Δ score [CI] (p) |", "|---|---|---|---|"]
        for name, m in compared.items():
            parts = [
                f"{s}: {m[f'{s}_diff']:+.4f} [{m[f'{s}_ci_low']:+.4f}, {m[f'{s}_ci_high']:+.4f}] "
                f"(p={m[f'{s}_p']:.3f})"
                for s in ("clip_score", "quality", "verifier")
                if f"{s}_diff" in m
            ]
            lines.append(f"| {name} | {m['vs']} | {m['nfe_diff']:+.2f} | {'<br>'.join(parts)} |")
    framed = {n: m for n, m in metrics.items() if "frontier" in m}
    if framed:
        lines += ["", "## Against the all-solver fixed-schedule frontier", ""]
        lines += [
            "Score − the frontier interpolated at the method's mean NFE (per item, between the "
            "two fixed schedules that bracket it); prompt-cluster bootstrap CI; nfe_ratio = NFE / "
            "NFE of the cheapest fixed schedule at least as good; oracle_ratio = NFE / the "
            "per-item hindsight oracle's NFE at the same score. Per category: the same on that "
            "category's items.",
            "",
        ]
        lines += [
            "| method | items | NFE | score | frontier | gain [CI] | nfe_ratio | oracle_ratio |"
        ]
        lines += ["|---|---|---|---|---|---|---|---|"]
        for name, m in framed.items():
            rows = [("all", m["frontier"])]
            rows += sorted(m.get("frontier_by_category", {}).items())
            for cat, f in rows:
                lines.append(
                    f"| {name} | {cat} | {f['nfe']:.2f} | {f['score']:.4f} | {f['frontier']:.4f} "
                    f"| {f['gain']:+.4f} [{f['ci'][0]:+.4f}, {f['ci'][1]:+.4f}] "
                    f"| {_fmt(f['nfe_ratio'])} | {_fmt(f['oracle_ratio'])} |"
                )
    cats = sorted({c for m in metrics.values() for c in m["by_category"]})
    if cats:
        lines += ["", "## By category (mean NFE / CLIP score)", ""]
        lines += ["| method | " + " | ".join(cats) + " |", "|" + "---|" * (len(cats) + 1)]
        for name, m in metrics.items():
            bc = m["by_category"]
            cells = [
                f"{bc[c]['nfe']:.2f} / {bc[c]['clip_score']:.4f}" if c in bc else "" for c in cats
            ]
            lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += _learned_lines(learned or {})
    lines += ["", "![pareto](pareto.png)", "", "![samples](samples.png)", ""]
    path.write_text("\n".join(lines))


def _learned_lines(learned: Mapping[str, Any]) -> list[str]:
    lines: list[str] = []
    ck = learned.get("checkpoints")
    if ck:
        lines += ["", "## Off-policy evaluation (FQE) against rollout, over checkpoints", ""]
        lines += [
            f"Spearman rank correlation of FQE and held-out rollout return over {ck['n_points']} "
            f"(policy, checkpoint) points: {_fmt(ck['spearman'])} (per method: "
            + ", ".join(f"{m} {_fmt(v)}" for m, v in ck["spearman_by_method"].items())
            + "). Return = (1 + terminal_bonus)·Q − c_nfe·NFE (up to a constant shared by all).",
            "",
            "| method | step | FQE | return | NFE | score |",
            "|---|---|---|---|---|---|",
        ]
        for p in ck["points"]:
            lines.append(
                f"| {p['method']} | {p['step']} | {_fmt(p['fqe'])} | {_fmt(p['return'])} "
                f"| {p['nfe']:.2f} | {_fmt(p['score'])} |"
            )
        lines += [
            "",
            "Checkpoint selection (cross-fitted over two halves of the held-out prompts: picked "
            "on one, scored on the other): by FQE vs by validation rollout.",
            "",
            "| method | FQE picks | rollout picks | return (FQE pick) | return (rollout pick) "
            "| return (last) | regret of FQE |",
            "|---|---|---|---|---|---|---|",
        ]
        for m, sel in ck["selection"].items():
            lines.append(
                f"| {m} | {sel['fqe_pick']} | {', '.join(map(str, sel['rollout_picks']))} "
                f"| {_fmt(sel['fqe_return'])} | {_fmt(sel['rollout_return'])} "
                f"| {_fmt(sel['final_return'])} | {_fmt(sel['regret'])} |"
            )
    pairs = learned.get("pairs")
    if pairs:
        lines += ["", "## Learned methods against each other (paired, prompt-cluster CI)", ""]
        lines += ["| pair | value | diff [CI] (p) |", "|---|---|---|"]
        for pair, values in pairs.items():
            for key, r in values.items():
                lines.append(
                    f"| {pair} | {key} | {r['diff']:+.4f} [{r['ci_low']:+.4f}, "
                    f"{r['ci_high']:+.4f}] (p={r['p']:.3f}) |"
                )
    seeds = learned.get("seeds")
    if seeds:
        lines += ["", "## Over training seeds (mean ± std)", ""]
        lines += ["| method | seeds | NFE | score | gain |", "|---|---|---|---|---|"]
        for m, row in seeds.items():
            score = next(
                k[:-5] for k in row if k.endswith("_mean") and k not in ("nfe_mean", "gain_mean")
            )
            lines.append(
                f"| {m} | {row['n_seeds']} | {row['nfe_mean']:.2f} ± {row['nfe_std']:.2f} "
                f"| {row[score + '_mean']:.4f} ± {row[score + '_std']:.4f} "
                f"| {row['gain_mean']:+.4f} ± {row['gain_std']:.4f} |"
            )
    return lines
