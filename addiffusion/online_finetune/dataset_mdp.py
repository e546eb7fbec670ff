"""The train prompts of a built dataset (the one env-specific thing online fine-tuning reads
besides the task).

Everything else about the dataset's MDP (backbone, scheduler, scorer, sampler settings, action
table, components and their stats, observation layout) is :func:`addiffusion.task.read_task`'s,
and the sampler is :func:`addiffusion.task.task_sampler`'s. The prompts come from the dataset's
``data/episodes/*.parquet`` table (``prompt``, ``split``, optional ``prompt_id`` and
``parent_episode_id``).
"""

from __future__ import annotations

from pathlib import Path

import polars as pl


def _episode_tables(dataset_dir: Path) -> list[Path]:
    files = sorted((Path(dataset_dir) / "data" / "episodes").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"{Path(dataset_dir) / 'data' / 'episodes'} holds no Parquet file: not a built dataset"
        )
    return files


def train_prompts(dataset_dir: Path) -> tuple[str, ...]:
    """Distinct prompts of the train split's root episodes, in prompt-id order."""
    files = _episode_tables(dataset_dir)
    table = pl.concat([pl.read_parquet(f) for f in files], how="diagonal_relaxed")
    missing = {"prompt", "split"} - set(table.columns)
    if missing:
        raise KeyError(f"{files[0]}: episodes table lacks column(s) {sorted(missing)}")
    if "parent_episode_id" in table.columns:  # branches repeat their root's prompt
        table = table.filter(pl.col("parent_episode_id").is_null())
    train = table.filter(pl.col("split") == "train")
    order = ["prompt_id", "prompt"] if "prompt_id" in train.columns else ["prompt"]
    prompts = train.sort(order)["prompt"].unique(maintain_order=True).to_list()
    if not prompts:
        raise ValueError(
            f"{dataset_dir}: no train-split episodes (splits found: "
            f"{sorted(table['split'].unique().to_list())})"
        )
    return tuple(prompts)
