"""The MDP a dataset was collected on, read back from the built dataset folder.

Fine-tuning must run on the same MDP as the offline data: same backbone, scheduler, scorer,
sampler settings (``n_max``, warm-up, guidance, size, ...), the same reward components with the
dataset's normalisation stats, and the dataset's train-split prompts. All of it is in the
dataset's ``meta/info.json`` (written by ``datasets build``: model ids, ``sampler`` settings,
``components``, ``component_stats`` of the train split, ``observation`` layout) and its
``data/episodes/*.parquet`` table (``prompt``, ``split``, ...).
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import polars as pl

from addiffusion.diffusion.sampler import SamplerSettings, StepwiseSampler


@dataclass(frozen=True)
class DatasetMDP:
    """What the env needs from a dataset (``dataset_dir``)."""

    dataset_dir: Path
    backbone: str
    scheduler: str
    scorer: str
    settings: SamplerSettings
    components: tuple[str, ...]
    component_stats: dict[str, dict[str, float]]
    obs_dim: int | None
    train_prompts: tuple[str, ...]
    drop_components: tuple[str, ...] = ()
    """Pipeline components the collector loaded as None (e.g. SD3's T5), if it recorded any."""
    extra_scorer_models: dict[str, str] = field(default_factory=dict)
    """Model ids of the extra scorers (ImageReward, PickScore) the collector used."""


def _require(info: dict[str, Any], key: str, path: Path) -> Any:
    if key not in info:
        raise KeyError(
            f"{path} has no {key!r} entry (keys found: {', '.join(sorted(info))}); "
            "rebuild the dataset with `addiffusion datasets build`"
        )
    return info[key]


def sampler_settings(data: dict[str, Any], where: str) -> SamplerSettings:
    """``SamplerSettings`` from the recorded mapping; keys the code does not know are an error
    (the data was collected by a sampler this code cannot reproduce)."""
    known = {f.name for f in dataclasses.fields(SamplerSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"{where}: sampler setting {unknown[0]!r} is unknown to this version of the sampler "
            f"(known: {', '.join(sorted(known))})"
        )
    return SamplerSettings(**data)


def _component_stats(info: dict[str, Any], path: Path) -> dict[str, dict[str, float]]:
    stats = {}
    for name, s in info.get("component_stats", {}).items():
        if not (isinstance(s, dict) and "mean" in s and "std" in s):
            raise ValueError(f"{path}: component_stats.{name} must be {{mean, std}}, got {s!r}")
        stats[name] = {"mean": float(s["mean"]), "std": float(s["std"])}
    return stats


def _episode_tables(dataset_dir: Path) -> list[Path]:
    files = sorted((dataset_dir / "data" / "episodes").glob("*.parquet"))
    if not files:
        raise FileNotFoundError(
            f"{dataset_dir / 'data' / 'episodes'} holds no Parquet file: not a built dataset"
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


def read_dataset_mdp(dataset_dir: Path) -> DatasetMDP:
    """Read ``meta/info.json`` and the train prompts of a built dataset."""
    dataset_dir = Path(dataset_dir)
    path = dataset_dir / "meta" / "info.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: {dataset_dir} is not a built dataset")
    info = json.loads(path.read_text())
    settings = _require(info, "sampler", path)
    obs_dim = info.get("observation", {}).get("dim")
    return DatasetMDP(
        dataset_dir=dataset_dir,
        backbone=str(_require(info, "backbone", path)),
        scheduler=str(_require(info, "scheduler", path)),
        scorer=str(_require(info, "scorer", path)),
        settings=sampler_settings(settings, f"{path} 'sampler'"),
        components=tuple(_require(info, "components", path)),
        component_stats=_component_stats(info, path),
        obs_dim=int(obs_dim) if obs_dim is not None else None,
        train_prompts=train_prompts(dataset_dir),
        drop_components=tuple(info.get("drop_components", ())),
        extra_scorer_models=dict(info.get("extra_scorer_models", {})),
    )


def build_sampler(mdp: DatasetMDP, device: str) -> StepwiseSampler:
    """The dataset's sampler (backbone, scheduler, scorer, settings) on ``device``."""
    from addiffusion.diffusion.backbone import load_pipeline, resolve_device
    from addiffusion.rewards.clip import ClipScorer
    from addiffusion.rewards.extra import build_extra_scorers

    dev = resolve_device(device)
    pipe = load_pipeline(mdp.backbone, mdp.scheduler, str(dev), drop_components=mdp.drop_components)
    return StepwiseSampler(
        pipe,
        ClipScorer(mdp.scorer, dev),
        mdp.settings,
        build_extra_scorers(mdp.components, mdp.extra_scorer_models, dev),
    )
