"""The evaluation set: the built dataset's held-out prompts, its sampler settings and stats.

Reads the layout ``datasets build`` writes (:mod:`addiffusion.datasets.build`):
``<dataset>/meta/info.json`` (model ids, ``sampler`` settings, ``components`` and their
``component_stats``, ``observation`` layout) and ``<dataset>/data/episodes/*.parquet`` (root
episodes with ``split == "heldout"``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from addiffusion.diffusion.sampler import SamplerSettings
from addiffusion.eval.config import EvalConfig
from addiffusion.task import Task, read_task


@dataclass(frozen=True)
class EvalItem:
    """One (prompt, seed) pair to evaluate."""

    prompt_id: int
    prompt: str
    category: str
    seed: int


@dataclass(frozen=True)
class HeldoutSet:
    """What :func:`load_heldout` returns: the pairs plus the dataset's task."""

    items: list[EvalItem]
    task: Task

    @property
    def info(self) -> dict[str, Any]:
        return self.task.info

    @property
    def sampler(self) -> SamplerSettings:
        return self.task.settings

    @property
    def stats(self) -> dict[str, dict[str, float]]:
        return self.task.component_stats

    @property
    def components(self) -> list[str]:
        return list(self.task.components)


def _episode_files(dataset_dir: Path) -> list[Path]:
    files = sorted((Path(dataset_dir) / "data" / "episodes").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"{dataset_dir}/data/episodes/ holds no Parquet files: not a built dataset (run "
            "`addiffusion datasets build` on a collected store first)"
        )
    return files


def heldout_prompts(dataset_dir: Path) -> pl.DataFrame:
    """Distinct held-out prompts: columns prompt_id, prompt, category, sorted by prompt_id."""
    episodes = pl.concat([pl.read_parquet(f) for f in _episode_files(dataset_dir)], how="diagonal")
    need = {"prompt_id", "prompt", "category", "split"}
    if not need <= set(episodes.columns):
        raise ValueError(
            f"the episodes table of {dataset_dir} lacks columns {sorted(need - set(episodes.columns))}"
        )
    if "parent_episode_id" in episodes.columns:
        episodes = episodes.filter(pl.col("parent_episode_id").is_null())
    held = (
        episodes.filter(pl.col("split") == "heldout")
        .select("prompt_id", "prompt", "category")
        .unique(subset="prompt_id")
        .sort("prompt_id")
    )
    if held.height == 0:
        splits = episodes["split"].unique().sort().to_list()
        raise ValueError(
            f"{dataset_dir} has no held-out prompts (episodes.split values: {splits}); collect "
            "with collect.heldout_fraction > 0 so that some prompts are kept for evaluation"
        )
    return held


def load_heldout(dataset_dir: Path, cfg: EvalConfig, prompts: str | None = None) -> HeldoutSet:
    """The held-out (prompt, seed) pairs of ``cfg`` (``n_prompts`` first prompts by id, each with
    ``seeds_per_prompt`` seeds), in prompt-major order.

    ``prompts``: evaluate a prompt list the user brings instead of the dataset's held-out
    prompts: any source :func:`addiffusion.collect.prompts.load_prompts` reads (a .txt / .csv /
    .tsv / .json / .jsonl file in the benchmark layouts, ``builtin``, ``shapes``, ``hf:<id>``);
    every prompt is evaluated, with the same seed formula."""
    task = read_task(dataset_dir)
    if prompts is None:
        held = heldout_prompts(dataset_dir)
    else:
        from addiffusion.collect.prompts import load_prompts

        records = load_prompts(prompts, cfg.n_prompts, heldout_fraction=1.0, seed=cfg.seed)
        held = pl.DataFrame(
            {
                "prompt_id": [r.prompt_id for r in records],
                "prompt": [r.text for r in records],
                "category": [r.category for r in records],
            }
        )
    if cfg.n_prompts:
        held = held.head(cfg.n_prompts)
    items = [
        EvalItem(
            int(pid),
            str(text),
            str(cat),
            cfg.seed * 1_000_003 + int(pid) * cfg.seeds_per_prompt + s,
        )
        for pid, text, cat in held.iter_rows()
        for s in range(cfg.seeds_per_prompt)
    ]
    return HeldoutSet(items, task)
