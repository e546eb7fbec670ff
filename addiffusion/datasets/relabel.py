"""``datasets relabel``: rewards of every step, derived from the raw components (never stored
as the only truth). Reuses :mod:`addiffusion.rewards.reward` — one definition of the reward.

For each step i of each episode (root or branch), with Q_i the quality of x̂0_i:

* ``r_continue``: continue from i to i+1 of the same episode (null at the episode's last step)
* ``r_stop``: stop at i (counterfactual for every step: stopping = decoding x̂0_i)
* ``r_refine``: refine at i, where a recorded branch leaves the episode at i (null elsewhere;
  with several branches at one step, the one with the smallest episode id)
* ``r_enter``: on a branch's first row, the reward of the refine transition into it

Output: a Parquet file (episode_id, step, q, r_continue, r_stop, r_refine, r_enter) and a JSON
summary beside it (``<out>.json``).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from addiffusion.rewards.config import RewardConfig
from addiffusion.rewards.reward import quality, step_reward, stop_reward

REWARD_COLUMNS = ("q", "r_continue", "r_stop", "r_refine", "r_enter")


def read_info(dataset_dir: Path) -> dict[str, Any]:
    path = Path(dataset_dir) / "meta" / "info.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {dataset_dir} is not a built dataset (run "
            "`addiffusion datasets build`)"
        )
    return json.loads(path.read_text())


def info_sha256(dataset_dir: Path) -> str:
    return hashlib.sha256((Path(dataset_dir) / "meta" / "info.json").read_bytes()).hexdigest()


def scan_table(dataset_dir: Path, name: str) -> pl.LazyFrame:
    files = sorted((Path(dataset_dir) / "data" / name).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{dataset_dir}/data/{name}/ holds no Parquet files")
    return pl.scan_parquet(files)


def compute_rewards(
    steps: pl.DataFrame,
    episodes: pl.DataFrame,
    cfg: RewardConfig,
    stats: dict[str, dict[str, float]] | None,
) -> pl.DataFrame:
    """steps: episode_id, step, nfe + component columns; episodes: episode_id,
    parent_episode_id, branch_step. Returns one row per step, sorted by (episode_id, step)."""
    steps = steps.sort("episode_id", "step")
    # quality() itself names a weighted component the data lacks.
    q = quality({c: steps[c].to_numpy() for c in steps.columns if c in cfg.weights}, cfg, stats)
    eid = steps["episode_id"]
    nfe = steps["nfe"].to_numpy().astype(np.float64)
    same_next = (eid.shift(-1) == eid).fill_null(False).to_numpy()
    q_next = np.roll(q, -1)
    nfe_next = np.roll(nfe, -1)
    r_cont = step_reward(q, q_next, nfe_next - nfe, cfg)
    out = steps.select("episode_id", "step").with_columns(
        pl.Series("q", q.astype(np.float32)),
        pl.Series("r_continue", np.where(same_next, r_cont, np.nan)).fill_nan(None),
        pl.Series("r_stop", stop_reward(q, cfg)),
    )
    # Refine: parent row (parent, branch_step) -> branch's first row (branch_step + 1). Rows are
    # located through per-episode start rows (a few thousand episodes), not 1M-row joins.
    starts = np.flatnonzero(~np.concatenate([[False], same_next[:-1]]))
    start_of = dict(zip(eid.gather(starts).to_list(), starts.tolist(), strict=True))
    steps_np = steps["step"].to_numpy()
    r_refine = np.full(len(q), np.nan)
    r_enter = np.full(len(q), np.nan)
    branches = episodes.filter(pl.col("parent_episode_id").is_not_null()).sort(
        "episode_id", descending=True
    )  # smallest id written last: it wins
    for bid, parent, bstep in branches.select(
        "episode_id", "parent_episode_id", "branch_step"
    ).iter_rows():
        b0, p0 = start_of.get(bid), start_of.get(parent)
        if b0 is None or p0 is None or steps_np[b0] != bstep + 1:
            continue  # branch or parent not in these rows (validate reports broken indices)
        prow = p0 + bstep - int(steps_np[p0])
        if not (p0 <= prow < len(q) and eid[prow] == parent and steps_np[prow] == bstep):
            continue
        r = step_reward(q[prow], q[b0], nfe[b0] - nfe[prow], cfg)
        r_refine[prow] = r
        r_enter[b0] = r
    out = out.with_columns(
        pl.Series("r_refine", r_refine).fill_nan(None), pl.Series("r_enter", r_enter).fill_nan(None)
    )
    return out.with_columns(pl.col(c).cast(pl.Float32) for c in REWARD_COLUMNS)


def relabel(dataset_dir: Path, reward_cfg: RewardConfig, out_path: Path) -> dict[str, Any]:
    """Recompute rewards of every step of a built dataset; writes ``out_path`` (Parquet) and
    ``out_path.with_suffix('.json')`` (summary). The dataset is only read."""
    dataset_dir, out_path = Path(dataset_dir), Path(out_path)
    info = read_info(dataset_dir)
    missing = sorted(set(reward_cfg.weights) - set(info.get("components", [])))
    if missing:
        raise KeyError(
            f"rewards.weights names component {missing[0]!r}, which {dataset_dir} "
            f"does not record (components: {', '.join(info.get('components', []))})"
        )
    stats = info.get("component_stats") if reward_cfg.normalize else None
    cols = ["episode_id", "step", "nfe", *reward_cfg.weights]
    steps = scan_table(dataset_dir, "steps").select(cols).collect()
    episodes = (
        scan_table(dataset_dir, "episodes")
        .select("episode_id", "parent_episode_id", "branch_step")
        .collect()
    )
    rewards = compute_rewards(steps, episodes, reward_cfg, stats)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rewards.write_parquet(out_path)
    summary = {
        "rows": rewards.height,
        "dataset_info_sha256": info_sha256(dataset_dir),
        "rewards": reward_cfg.to_dict(),
        **{f"mean_{c}": _mean(rewards[c]) for c in REWARD_COLUMNS},
        "refine_edges": int(rewards["r_refine"].is_not_null().sum()),
    }
    out_path.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return summary


def _mean(s: pl.Series) -> float | None:
    v = s.drop_nulls()
    return float(v.mean()) if v.len() else None  # type: ignore[arg-type]
