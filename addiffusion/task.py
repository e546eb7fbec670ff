"""The task a dataset describes, read back by one strict reader; and the one sampler factory.

A built dataset's ``meta/info.json`` (written by ``datasets build`` from the shards' info, which
``collect`` writes) says which MDP its trajectories live in: backbone, scheduler, scorer, reward
components and their normalisation stats, sampler settings, the action table and the observation
layout, and which decoder produced the observations. Offline RL, online fine-tuning and
evaluation must all run on that same MDP, so all of them read it here (:func:`read_task`) and
build their sampler with :func:`make_sampler`.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from addiffusion.config import UserError
from addiffusion.diffusion.actions import ActionTable
from addiffusion.diffusion.mdp import ObservationLayout

if TYPE_CHECKING:
    from addiffusion.diffusion.sampler import SamplerSettings, StepwiseSampler

REQUIRED_KEYS = ("backbone", "scheduler", "scorer", "sampler", "components", "actions")


def read_info(dataset_dir: Path) -> dict[str, Any]:
    """``meta/info.json`` of a built dataset as a dict (the file must exist and be an object)."""
    path = Path(dataset_dir) / "meta" / "info.json"
    if not path.is_file():
        raise FileNotFoundError(
            f"{path} not found: {dataset_dir} is not a built dataset (run `addiffusion datasets "
            "build` on a collected store first)"
        )
    try:
        info = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ValueError(f"{path} is not valid JSON: {e}") from e
    if not isinstance(info, dict):
        raise ValueError(f"{path} must hold a JSON object, got {type(info).__name__}")
    return info


def sampler_settings(data: Any, where: str) -> SamplerSettings:
    """``SamplerSettings`` from the recorded mapping: every key must be known to this sampler
    (else the data was collected by a sampler this code cannot reproduce)."""
    from addiffusion.diffusion.sampler import SamplerSettings

    if not isinstance(data, dict):
        raise ValueError(f"{where} must be an object, got {data!r}")
    known = {f.name for f in dataclasses.fields(SamplerSettings)}
    unknown = sorted(set(data) - known)
    if unknown:
        raise ValueError(
            f"{where}: sampler setting {unknown[0]!r} is unknown to this version of the sampler "
            f"(known: {', '.join(sorted(known))})"
        )
    values = dict(data)
    for key in ("strides", "timesteps"):
        if key in values:
            values[key] = tuple(int(s) for s in values[key])
    try:
        return SamplerSettings(**values)
    except ValueError as e:
        raise ValueError(f"{where}: {e}") from e


@dataclass(frozen=True)
class Task:
    """The MDP of a dataset (see the module docstring)."""

    backbone: str
    scheduler: str
    scorer: str
    settings: SamplerSettings
    actions: ActionTable
    components: tuple[str, ...]
    component_stats: dict[str, dict[str, float]]
    observation: ObservationLayout | None
    drop_components: tuple[str, ...] = ()
    extra_scorer_models: dict[str, str] = field(default_factory=dict)
    preview: str = ""
    """The preview decoder of the observations (folder or Hub id) when ``settings.observe_with``
    is ``preview``, else empty."""
    info: dict[str, Any] = field(default_factory=dict, compare=False, repr=False)
    """The whole ``meta/info.json`` (model ids, behaviour policy, ...), for reports."""

    @property
    def obs_dim(self) -> int | None:
        return None if self.observation is None else self.observation.dim

    @property
    def observer(self) -> dict[str, str]:
        """Which decoder produced the observations: what a policy trained on them records, and
        what evaluation checks (:func:`check_observer`)."""
        return observer(self.settings.observe_with, self.preview)


def observer(observe_with: str, preview: str) -> dict[str, str]:
    """``{"observe_with", "preview"}``, the preview empty unless it is used."""
    return {"observe_with": observe_with, "preview": preview if observe_with == "preview" else ""}


class ObserverMismatch(UserError, ValueError):
    """A policy was trained on observations of another decoder than the task's."""


def check_observer(task: Task, recorded: dict[str, Any] | None, what: str) -> None:
    """Refuse ``what`` (a policy) whose training observations were decoded by another decoder than
    the task's: its inputs would come from a different distribution. ``recorded`` None: a policy
    from before observers were recorded, whose observations were the full VAE's."""
    mine = observer(**(recorded or {"observe_with": "vae", "preview": ""}))
    if mine != task.observer:
        raise ObserverMismatch(
            f"{what} was trained on observations decoded by {_describe(mine)}, but this dataset's "
            f"observations are decoded by {_describe(task.observer)}: evaluate it on a dataset "
            "collected with the same collect.observe_with / collect.preview, or retrain it on "
            "this one"
        )


def _describe(obs: dict[str, str]) -> str:
    return (
        "the full VAE"
        if obs["observe_with"] == "vae"
        else f"the preview decoder {obs['preview']!r}"
    )


def task_from_info(info: dict[str, Any], where: str) -> Task:
    """Strict :class:`Task` from an info mapping (a dataset's or a shard's); ``where`` names it."""
    missing = [k for k in REQUIRED_KEYS if k not in info]
    if missing:
        raise ValueError(
            f"{where} has no {missing[0]!r} entry (keys found: {', '.join(sorted(info))}); "
            "rebuild the dataset with this version (`addiffusion collect` + `datasets build`)"
        )
    stats = {}
    for name, s in (info.get("component_stats") or {}).items():
        if not (isinstance(s, dict) and "mean" in s and "std" in s):
            raise ValueError(f"{where}: component_stats.{name} must be {{mean, std}}, got {s!r}")
        stats[name] = {"mean": float(s["mean"]), "std": float(s["std"])}
    obs = info.get("observation")
    try:
        layout = ObservationLayout.from_dict(obs) if obs else None
    except (KeyError, TypeError) as e:
        raise ValueError(f"{where}: observation layout is malformed ({e!r}): {obs!r}") from e
    settings = sampler_settings(info["sampler"], f"{where} 'sampler'")
    preview = str(info.get("preview", ""))
    if settings.observe_with == "preview" and not preview:
        raise ValueError(
            f"{where}: the sampler observes with a preview decoder but no 'preview' entry names it"
        )
    table = ActionTable.from_dict(info["actions"], f"{where} 'actions'")
    if table.n_max != settings.n_max:
        raise ValueError(f"{where}: actions.n_max {table.n_max} != sampler.n_max {settings.n_max}")
    return Task(
        backbone=str(info["backbone"]),
        scheduler=str(info["scheduler"]),
        scorer=str(info["scorer"]),
        settings=settings,
        actions=table,
        components=tuple(info["components"]),
        component_stats=stats,
        observation=layout,
        drop_components=tuple(info.get("drop_components", ())),
        extra_scorer_models=dict(info.get("extra_scorer_models", {})),
        preview=preview if settings.observe_with == "preview" else "",
        info=info,
    )


def read_task(dataset_dir: Path) -> Task:
    """The task of the built dataset at ``dataset_dir`` (strict: see :func:`task_from_info`)."""
    path = Path(dataset_dir) / "meta" / "info.json"
    return task_from_info(read_info(dataset_dir), str(path))


def make_sampler(
    backbone: str,
    scheduler: str,
    scorer: str,
    settings: SamplerSettings,
    components: tuple[str, ...] | list[str],
    extra_scorer_models: dict[str, str],
    device: str,
    drop_components: tuple[str, ...] | list[str] = (),
    preview: str = "",
) -> StepwiseSampler:
    """The one sampler factory: the pipeline, CLIP scorer, extra scorers and (when
    ``settings.observe_with`` is ``preview``) the preview decoder ``preview`` on ``device``."""
    from addiffusion.diffusion.backbone import load_pipeline, load_preview, resolve_device
    from addiffusion.diffusion.sampler import StepwiseSampler
    from addiffusion.rewards.clip import ClipScorer
    from addiffusion.rewards.extra import build_extra_scorers

    dev = resolve_device(device)
    pipe = load_pipeline(backbone, scheduler, str(dev), drop_components=tuple(drop_components))
    extra = build_extra_scorers(list(components), dict(extra_scorer_models), dev)
    decoder = None
    if settings.observe_with == "preview":
        decoder = load_preview(preview, dev, pipe.vae.dtype)
    return StepwiseSampler(pipe, ClipScorer(scorer, dev), settings, extra, preview=decoder)


def task_sampler(
    task: Task,
    device: str,
    scheduler: str | None = None,
    observe: bool = True,
    share: StepwiseSampler | None = None,
    **overrides: Any,
) -> StepwiseSampler:
    """:func:`make_sampler` for a dataset's task. ``overrides`` replace sampler settings and
    ``scheduler`` the solver (eval's fixed baselines use other grids and solvers); ``share``
    reuses another sampler's pipeline and scorers instead of loading them again."""
    settings = dataclasses.replace(task.settings, **overrides)
    if share is None:
        base = make_sampler(
            task.backbone,
            task.scheduler,
            task.scorer,
            settings,
            task.components,
            task.extra_scorer_models,
            device,
            task.drop_components,
            task.preview,
        )
        if scheduler is None and observe:
            return base
        share = base
    from addiffusion.diffusion.backbone import SCHEDULERS
    from addiffusion.diffusion.sampler import StepwiseSampler

    sched = share.scheduler
    if scheduler is not None:
        if scheduler not in SCHEDULERS:
            raise ValueError(
                f"unknown scheduler {scheduler!r}; expected one of {', '.join(SCHEDULERS)}"
            )
        cls, kwargs = SCHEDULERS[scheduler]
        sched = cls.from_config(share.scheduler.config, **kwargs)
    return StepwiseSampler(
        share.pipe,
        share.scorer,
        settings,
        share.extra_scorers,
        observe=observe,
        scheduler=sched,
        preview=share.preview,
    )
