"""``datasets relabel``: rewards of every step, derived from the raw components (never stored
as the only truth). Reuses :mod:`addiffusion.rewards.reward` — one definition of the reward.

For each row (episode, step i) of each episode (root or branch), with Q_i the quality of x̂0_i:

* ``r_action``: reward of the row's recorded action, to the episode's next row (a jump's next
  point, a refine's i+1): ``step_reward(Q_i, Q_next, nfe_next - nfe_i)``; null on the last row
* ``r_stop``: stop at i (counterfactual for every row: stopping = decoding x̂0_i)
* ``r_enter``: on a branch's first row, the reward of the branch transition into it, from the
  parent's row at ``branch_step`` (``branch_action``); null elsewhere

Rows are located by (episode_id, step) keys, never by step arithmetic (steps are not
contiguous). Output: a Parquet file (episode_id, step, q, r_action, r_stop, r_enter) and a JSON
summary beside it (``<out>.json``).

An unreadable Parquet file and a weighted component that is null, NaN or infinite are refused
here (:class:`~addiffusion.config.UserError` naming the file and row), not mid-training.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from addiffusion.config import ConfigError, UserError
from addiffusion.rewards.config import RewardConfig
from addiffusion.rewards.reward import quality, step_reward, stop_reward
from addiffusion.task import read_info

REWARD_COLUMNS = ("q", "r_action", "r_stop", "r_enter")


def info_sha256(dataset_dir: Path) -> str:
    return hashlib.sha256((Path(dataset_dir) / "meta" / "info.json").read_bytes()).hexdigest()


def scan_table(dataset_dir: Path, name: str) -> pl.LazyFrame:
    files = sorted((Path(dataset_dir) / "data" / name).glob("*.parquet"))
    if not files:
        raise FileNotFoundError(f"{dataset_dir}/data/{name}/ holds no Parquet files")
    return pl.scan_parquet(files)


def read_table(
    dataset_dir: Path, name: str, columns: list[str], finite: tuple[str, ...] = ()
) -> pl.DataFrame:
    """``columns`` of the ``data/<name>/*.parquet`` files, read file by file so that a corrupt
    file, or a null / NaN / infinite value in a ``finite`` column, is named with its row
    (:class:`UserError`): every reward and quality computed from such a value would carry it."""
    files = sorted((Path(dataset_dir) / "data" / name).glob("*.parquet"))
    if not files:
        raise UserError(
            f"{dataset_dir}/data/{name}/ holds no Parquet files: is {dataset_dir} a dataset "
            "built by `addiffusion datasets build`?"
        )
    frames = []
    for f in files:
        try:
            frame = pl.read_parquet(f, columns=columns)
        except (pl.exceptions.PolarsError, OSError) as e:
            first = (str(e).strip() or type(e).__name__).splitlines()[0]
            raise UserError(
                f"{f}: cannot read Parquet ({first}); rebuild the dataset with "
                "`addiffusion datasets build`"
            ) from e
        for c in finite:
            values = frame[c].cast(pl.Float64)
            bad = values.is_null() | ~values.fill_null(0.0).is_finite()
            if bad.any():
                i = int(bad.arg_max())  # type: ignore[arg-type]
                raise UserError(
                    f"{f}: row {i} (episode_id {frame['episode_id'][i]}, step "
                    f"{frame['step'][i]}): {c} is {values[i]} ({int(bad.sum())} such row(s) in "
                    f"this file); rewards need finite components: rebuild the dataset, or drop "
                    f"{c} from rewards.weights"
                )
        frames.append(frame)
    return pl.concat(frames, how="vertical_relaxed")


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
    # Sorted by (episode_id, step): the next row of the same episode is the episode's next row.
    same_next = (eid.shift(-1) == eid).fill_null(False).to_numpy()
    r_action = step_reward(q, np.roll(q, -1), np.roll(nfe, -1) - nfe, cfg)
    out = steps.select("episode_id", "step").with_columns(
        pl.Series("q", q.astype(np.float32)),
        pl.Series("r_action", np.where(same_next, r_action, np.nan)).fill_nan(None),
        pl.Series("r_stop", stop_reward(q, cfg)),
    )
    # Branch edges: parent row (parent, branch_step) -> the branch's first row, by key joins of
    # the (few) branches against the row index.
    keys = steps.select("episode_id", pl.col("step").cast(pl.Int64)).with_row_index("_i")
    is_first = np.concatenate([[True], ~same_next[:-1]]) if len(q) else np.zeros(0, bool)
    edges = (
        episodes.filter(pl.col("parent_episode_id").is_not_null())
        .select("episode_id", "parent_episode_id", pl.col("branch_step").cast(pl.Int64))
        .join(
            keys.filter(pl.Series(is_first)).select("episode_id", pl.col("_i").alias("_b")),
            on="episode_id",
        )
        .join(
            keys.select(
                pl.col("episode_id").alias("parent_episode_id"),
                pl.col("step").alias("branch_step"),
                pl.col("_i").alias("_p"),
            ),
            on=["parent_episode_id", "branch_step"],
        )
    )  # branches whose own or parent row is missing drop out (validate reports them)
    r_enter = np.full(len(q), np.nan)
    b, par = edges["_b"].to_numpy(), edges["_p"].to_numpy()
    if b.size:
        r_enter[b] = step_reward(q[par], q[b], nfe[b] - nfe[par], cfg)
    out = out.with_columns(pl.Series("r_enter", r_enter).fill_nan(None))
    return out.with_columns(pl.col(c).cast(pl.Float32) for c in REWARD_COLUMNS)


def relabel(dataset_dir: Path, reward_cfg: RewardConfig, out_path: Path) -> dict[str, Any]:
    """Recompute rewards of every step of a built dataset; writes ``out_path`` (Parquet) and
    ``out_path.with_suffix('.json')`` (summary). The dataset is only read."""
    dataset_dir, out_path = Path(dataset_dir), Path(out_path)
    info = read_info(dataset_dir)
    missing = sorted(set(reward_cfg.weights) - set(info.get("components", [])))
    if missing:
        raise ConfigError(
            f"rewards.weights names component {missing[0]!r}, which {dataset_dir} "
            f"does not record (components: {', '.join(info.get('components', []))})"
        )
    stats = info.get("component_stats") if reward_cfg.normalize else None
    cols = ["episode_id", "step", "nfe", *reward_cfg.weights]
    steps = read_table(dataset_dir, "steps", cols, finite=tuple(reward_cfg.weights))
    episodes = read_table(
        dataset_dir, "episodes", ["episode_id", "parent_episode_id", "branch_step"]
    )
    rewards = compute_rewards(steps, episodes, reward_cfg, stats)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    rewards.write_parquet(out_path)
    summary = {
        "rows": rewards.height,
        "dataset_info_sha256": info_sha256(dataset_dir),
        "rewards": reward_cfg.to_dict(),
        **{f"mean_{c}": _mean(rewards[c]) for c in REWARD_COLUMNS},
        "branch_edges": int(rewards["r_enter"].is_not_null().sum()),
    }
    out_path.with_suffix(".json").write_text(json.dumps(summary, indent=2))
    return summary


def _mean(s: pl.Series) -> float | None:
    v = s.drop_nulls()
    return float(v.mean()) if v.len() else None  # type: ignore[arg-type]
