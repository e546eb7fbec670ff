"""The live MDP of a built dataset: its task, its sampler and its train prompts, checked against
each other (:func:`load_dataset_mdp`; fine-tuning and the single-episode env both build it here).

The train prompts are the one env-specific thing online fine-tuning reads besides the task.
Everything else about the dataset's MDP (backbone, scheduler, scorer, sampler settings, action
table, components and their stats, observation layout) is :func:`addiffusion.task.read_task`'s,
and the sampler is :func:`addiffusion.task.task_sampler`'s. The prompts come from the dataset's
``data/episodes/*.parquet`` table (``prompt``, ``split``, optional ``prompt_id`` and
``parent_episode_id``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import polars as pl

from addiffusion.rewards.config import RewardConfig
from addiffusion.task import Task, read_task, task_sampler

if TYPE_CHECKING:
    from addiffusion.diffusion.sampler import StepwiseSampler


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


@dataclass(frozen=True)
class DatasetMDP:
    """A dataset's task, the sampler that runs it live, and its train prompts."""

    task: Task
    sampler: StepwiseSampler
    prompts: tuple[str, ...]


def load_dataset_mdp(dataset_dir: Path, device: str, rewards: RewardConfig) -> DatasetMDP:
    """Read the task of ``dataset_dir``, build its sampler on ``device`` and check that the live
    MDP is the recorded one (actions, observation dim; stats if ``rewards.normalize``)."""
    from addiffusion.online_finetune.env import observation_dim

    dataset_dir = Path(dataset_dir)
    task = read_task(dataset_dir)
    info_path = dataset_dir / "meta" / "info.json"
    if rewards.normalize and not task.component_stats:
        raise ValueError(
            f"rewards.normalize is true but {info_path} records no component stats; rebuild the "
            "dataset or set rewards.normalize: false"
        )
    prompts = train_prompts(dataset_dir)
    sampler = task_sampler(task, device)
    if sampler.table != task.actions:
        raise ValueError(
            f"the sampler built from {info_path} offers actions {list(sampler.table.names)}, but "
            f"the dataset records {list(task.actions.names)} (a scheduler without variable-stride "
            "steps offers only jump-1): the live MDP would not be the dataset's"
        )
    dim = observation_dim(sampler)
    if task.obs_dim is not None and task.obs_dim != dim:
        raise ValueError(
            f"the dataset's observations have dim {task.obs_dim}, this sampler's {dim}"
        )
    return DatasetMDP(task, sampler, prompts)
