"""Random-weight policy packages for the policy tests (a unique module name, so that it cannot
clash with other test folders' helpers)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import torch

from addiffusion.diffusion.actions import ActionTable
from addiffusion.diffusion.mdp import ObservationLayout
from addiffusion.diffusion.sampler import SamplerSettings
from addiffusion.online_finetune.actor import ActorSpec, MlpActor
from addiffusion.policy.package import AdaptivePolicy, PolicyConfig, build_policy

REPO = Path(__file__).resolve().parents[2]
SHAPES_PIPE = REPO / "assets" / "shapes" / "pipeline"
SHAPES_CLIP = REPO / "assets" / "shapes" / "clip"
SHAPES_PREVIEW = REPO / "assets" / "shapes" / "preview"
SHAPES = SamplerSettings(
    n_max=16, strides=(1, 2, 4, 8), refine_budget=1, guidance_scale=4.0, height=32, width=32
)
"""The default run's sampler settings (params.yaml's collect section)."""


def table_of(settings: SamplerSettings) -> ActionTable:
    return ActionTable.build(
        settings.strides,
        settings.n_max,
        settings.warmup,
        settings.refine_budget,
        settings.refine_k,
        reuse=settings.reuse,
    )


def random_package(
    settings: SamplerSettings = SHAPES,
    *,
    feature_dim: int = 64,
    family: str = "sd",
    solver: str = "ddim",
    scorer: str = str(SHAPES_CLIP),
    backbone: str = str(SHAPES_PIPE),
    seed: int = 0,
    networks: int = 1,
    algo: str = "iql",
    preview: str = str(SHAPES_PREVIEW),
    **config: Any,
) -> AdaptivePolicy:
    """A package with random weights whose greedy actions vary with the observation (its
    weights are scaled up, so the features, not the biases, decide). ``preview``: its
    observations' decoder when ``settings.observe_with`` is ``preview``; ``config``: more
    :class:`PolicyConfig` fields (``combine``, ``allowed_actions``, ...)."""
    table = table_of(settings)
    layout = ObservationLayout(feature_dim, feature_dim)
    spec = ActorSpec(layout.dim, (32,), table.n)
    torch.manual_seed(seed)
    nets = [MlpActor(spec) for _ in range(networks)]
    with torch.no_grad():
        for net in nets:
            for p in net.parameters():
                p.mul_(8.0)
    cfg = PolicyConfig(
        algo=algo,
        networks=(spec,) * networks,
        actions=table,
        observation=layout,
        scorer=scorer,
        backbone=backbone,
        family=family,
        solver=solver,
        sampler=dataclasses.asdict(settings),
        preview=preview if settings.observe_with == "preview" else "",
        **config,
    )
    return build_policy(cfg, nets)


def write_dataset_info(
    root: Path,
    settings: SamplerSettings,
    layout: ObservationLayout,
    components: list[str],
) -> Path:
    """``root`` as a built dataset's ``meta/info.json`` (what ``read_task`` reads) for a tiny
    SD task with ``settings``' action table and ``layout``; returns ``root``."""
    (root / "meta").mkdir(parents=True)
    info = {
        "backbone": "org/tiny-sd",
        "scheduler": "ddim",
        "scorer": "ViT-B-32@laion2b_s34b_b79k",
        "family": "sd",
        "components": components,
        "sampler": dataclasses.asdict(settings),
        "actions": table_of(settings).to_dict(),
        "observation": layout.to_dict(),
        "counts": {"episodes": 60, "root_episodes": 50, "steps": 300},
    }
    (root / "meta" / "info.json").write_text(json.dumps(info))
    return root
