"""The evaluation set: the built dataset's held-out prompts, its sampler settings and stats.

Reads the layout ``datasets build`` writes (:mod:`addiffusion.datasets.build`):
``<dataset>/meta/info.json`` (model ids, ``sampler`` settings, ``components`` and their
``component_stats``, ``observation`` layout) and ``<dataset>/data/episodes/*.parquet`` (root
episodes with ``split == "heldout"``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import polars as pl

from addiffusion.diffusion.sampler import SamplerSettings
from addiffusion.eval.config import EvalConfig

REQUIRED_SAMPLER_KEYS = (
    "n_max",
    "warmup",
    "refine_budget",
    "refine_k",
    "guidance_scale",
    "height",
    "width",
)


@dataclass(frozen=True)
class EvalItem:
    """One (prompt, seed) pair to evaluate."""

    prompt_id: int
    prompt: str
    category: str
    seed: int


@dataclass(frozen=True)
class HeldoutSet:
    """What :func:`load_heldout` returns: the pairs plus what the dataset says about them."""

    items: list[EvalItem]
    info: dict[str, Any]
    sampler: SamplerSettings
    stats: dict[str, dict[str, float]]

    @property
    def components(self) -> list[str]:
        return list(self.info.get("components", []))


def read_info(dataset_dir: Path) -> dict[str, Any]:
    path = Path(dataset_dir) / "meta" / "info.json"
    if not path.exists():
        raise FileNotFoundError(
            f"{path} not found: {dataset_dir} is not a built dataset (run `addiffusion datasets "
            "build` on a collected store first)"
        )
    info = json.loads(path.read_text())
    if not isinstance(info, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(info).__name__}")
    for key in ("backbone", "scheduler", "scorer", "sampler"):
        if key not in info:
            raise ValueError(f"{path} has no {key!r} entry (keys: {', '.join(sorted(info))})")
    return info


def sampler_settings(info: dict[str, Any]) -> SamplerSettings:
    """The MDP the dataset was collected on (``info["sampler"]``); settings it does not record
    beyond :data:`REQUIRED_SAMPLER_KEYS` keep their defaults."""
    raw = info["sampler"]
    if not isinstance(raw, dict):
        raise ValueError(f"meta/info.json sampler must be an object, got {raw!r}")
    missing = [k for k in REQUIRED_SAMPLER_KEYS if k not in raw]
    if missing:
        raise ValueError(f"meta/info.json sampler settings lack {missing} (got {sorted(raw)})")
    known = set(SamplerSettings.__dataclass_fields__)
    return SamplerSettings(**{k: v for k, v in raw.items() if k in known})


def component_stats(info: dict[str, Any]) -> dict[str, dict[str, float]]:
    """``info["component_stats"]``: ``{component: {"mean", "std"}}`` (empty when absent)."""
    stats = info.get("component_stats") or {}
    return {
        name: {"mean": float(s["mean"]), "std": float(s["std"])}
        for name, s in stats.items()
        if isinstance(s, dict) and "mean" in s and "std" in s
    }


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


def load_heldout(dataset_dir: Path, cfg: EvalConfig) -> HeldoutSet:
    """The held-out (prompt, seed) pairs of ``cfg`` (``n_prompts`` first prompts by id, each with
    ``seeds_per_prompt`` seeds), in prompt-major order."""
    info = read_info(dataset_dir)
    held = heldout_prompts(dataset_dir)
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
    return HeldoutSet(items, info, sampler_settings(info), component_stats(info))
