"""``datasets stats``: what a dataset holds, with polars. Writes ``stats.json`` and ``stats.png``.

Counts (episodes, roots, branches, steps, splits), behaviour actions (by the dataset's action
table's names), per category: steps and the returns of stopping at the end of the recorded path vs
the best stop on it in hindsight (rewards recomputed for the given
reward config), and the scale of each raw reward component (overall and per step).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import polars as pl

from addiffusion.datasets.relabel import compute_rewards, scan_table
from addiffusion.diffusion.actions import ActionTable
from addiffusion.rewards.config import RewardConfig
from addiffusion.task import read_info


def _component_scales(steps: pl.DataFrame, components: list[str]) -> dict[str, dict[str, float]]:
    out = {}
    for c in components:
        s = steps[c]
        out[c] = {
            "mean": float(s.mean()),
            "std": float(s.std() or 0.0),  # type: ignore[arg-type]
            "min": float(s.min()),
            "max": float(s.max()),  # type: ignore[arg-type]
            "p05": float(s.quantile(0.05) or 0.0),
            "p95": float(s.quantile(0.95) or 0.0),
        }
    return out


def stop_returns(rewards: pl.DataFrame, warmup: int) -> pl.DataFrame:
    """Per (episode, step): R(j) = Σ_{i<j} r_action_i + r_stop_j along the episode's recorded
    path (its rows before j), null in warm-up."""
    excl = pl.col("r_action").fill_null(0).cum_sum() - pl.col("r_action").fill_null(0)
    return rewards.sort("episode_id", "step").with_columns(
        pl.when(pl.col("step") >= warmup)
        .then(excl.over("episode_id") + pl.col("r_stop"))
        .otherwise(None)
        .alias("stop_return")
    )


def dataset_stats(dataset_dir: Path, reward_cfg: RewardConfig) -> dict[str, Any]:
    dataset_dir = Path(dataset_dir)
    info = read_info(dataset_dir)
    table = ActionTable.from_dict(info["actions"], f"{dataset_dir}/meta/info.json 'actions'")
    components = list(info["components"])
    episodes = scan_table(dataset_dir, "episodes").collect()
    steps = scan_table(dataset_dir, "steps").collect()
    stats = info.get("component_stats") if reward_cfg.normalize else None
    rewards = compute_rewards(
        steps.select("episode_id", "step", "nfe", *components), episodes, reward_cfg, stats
    )
    roots = episodes.filter(pl.col("parent_episode_id").is_null())
    ret = stop_returns(rewards, table.warmup).join(
        roots.select("episode_id", "category"), on="episode_id"
    )
    per_ep = ret.group_by("episode_id", "category").agg(
        pl.col("stop_return").last().alias("full"),
        pl.col("stop_return").max().alias("oracle"),
        pl.col("step")
        .sort_by("stop_return", descending=True, nulls_last=True)
        .first()
        .alias("oracle_step"),
    )
    cats = (
        per_ep.group_by("category")
        .agg(
            pl.len().alias("root_episodes"),
            pl.col("full").mean().alias("mean_return_full"),
            pl.col("oracle").mean().alias("mean_return_oracle"),
            pl.col("oracle_step").mean().alias("mean_oracle_stop_step"),
        )
        .join(
            steps.join(episodes.select("episode_id", "category"), on="episode_id")
            .group_by("category")
            .len("steps"),
            on="category",
        )
        .sort("category")
    )
    actions = steps.group_by("action").len().sort("action")
    per_step = steps.group_by("step").agg(*(pl.col(c).mean() for c in components)).sort("step")
    curve = (
        ret.group_by("category", "step").agg(pl.col("stop_return").mean()).sort("category", "step")
    )
    return {
        "dataset": str(dataset_dir),
        "episodes": episodes.height,
        "root_episodes": roots.height,
        "branches": episodes.height - roots.height,
        "steps": steps.height,
        "episodes_per_split": dict(episodes.group_by("split").len().sort("split").iter_rows()),
        "episodes_per_rl_split": dict(
            episodes.group_by("rl_split").len().sort("rl_split").iter_rows()
        ),
        "behaviour_actions": {table.names[a]: n for a, n in actions.iter_rows()},
        "categories": {r.pop("category"): r for r in cats.iter_rows(named=True)},
        "components": _component_scales(steps, components),
        "rewards": reward_cfg.to_dict(),
        "per_step_components": per_step.to_dict(as_series=False),
        "stop_return_curve": curve.to_dict(as_series=False),
    }


def write_stats(stats: dict[str, Any], out_dir: Path) -> tuple[Path, Path]:
    """``stats.json`` and ``stats.png`` (mean components per step; mean return of stopping at
    step j per category) under ``out_dir``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    js = out_dir / "stats.json"
    js.write_text(json.dumps(stats, indent=2))
    fig, (a, b) = plt.subplots(1, 2, figsize=(9, 3.5))
    ps = stats["per_step_components"]
    for c in stats["components"]:
        a.plot(ps["step"], ps[c], label=c)
    a.set(xlabel="step", ylabel="mean raw component", title="components per step")
    a.legend(fontsize=7)
    curve = pl.DataFrame(stats["stop_return_curve"])
    for cat in curve["category"].unique().sort().to_list() if curve.height else []:
        part = curve.filter(pl.col("category") == cat)
        b.plot(part["step"], part["stop_return"], marker=".", label=str(cat))
    b.set(xlabel="stop step j", ylabel="mean return", title="return of stopping at j")
    b.legend(fontsize=7)
    fig.tight_layout()
    png = out_dir / "stats.png"
    fig.savefig(png, dpi=80)
    plt.close(fig)
    return js, png
