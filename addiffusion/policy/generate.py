"""``addiffusion generate``'s library side: one prompt through the drop-in sampler, its trace as
JSON and its filmstrip (x̂0 at every decision with the action taken)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageDraw

from addiffusion.policy.package import AdaptivePolicy
from addiffusion.policy.pipeline import (
    AdaptiveDiffusionPipeline,
    ImageTrace,
    default_steps,
    missing_folder,
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass(frozen=True)
class Generated:
    image: Image.Image
    trace: ImageTrace
    default_steps: int
    """The stock pipeline's default ``num_inference_steps`` (its NFE per image)."""
    model: str


def load_adaptive(
    policy: str | Path,
    model: str | None = None,
    device: str = "auto",
    dtype: str = "float32",
    scorer: str | None = None,
    preview: str | None = None,
) -> AdaptiveDiffusionPipeline:
    """The package ``policy`` over the stock pipeline ``model`` (default: the package's
    backbone), loaded with ``DiffusionPipeline.from_pretrained``; ``scorer``: the open_clip
    scorer, ``preview``: the observations' preview decoder (defaults: the package's)."""
    from addiffusion.diffusion.backbone import load_pipeline

    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    if not Path(policy).exists() and str(policy).count("/") != 1:
        raise FileNotFoundError(
            f"policy package {policy} not found: expected a folder written by `addiffusion "
            "policy export` (or AdaptivePolicy.save_pretrained) or a Hub repo id org/name"
        )
    package = AdaptivePolicy.from_pretrained(str(policy))
    cfg = package.config
    if model is None:
        missing_folder(cfg.backbone, "backbone", "--model ")
    pipe = load_pipeline(
        model or cfg.backbone, cfg.solver, device, DTYPES[dtype], cfg.drop_components
    )
    return AdaptiveDiffusionPipeline(pipe, package, scorer, preview)


def generate(
    adaptive: AdaptiveDiffusionPipeline,
    prompt: str,
    seed: int = 0,
    negative_prompt: str | None = None,
    guidance_scale: float | None = None,
    keep_frames: bool = False,
) -> Generated:
    """One image of ``prompt`` from ``torch.Generator().manual_seed(seed)``'s noise."""
    out = adaptive(
        prompt,
        negative_prompt=negative_prompt,
        guidance_scale=guidance_scale,
        generator=torch.Generator("cpu").manual_seed(int(seed)),
        output_type="pil",
        keep_frames=keep_frames,
    )
    model = str(getattr(adaptive.pipe, "name_or_path", "") or adaptive.policy.config.backbone)
    return Generated(out.images[0], out.traces[0], default_steps(adaptive.pipe), model)


def write_trace(result: Generated, path: Path, extra: dict[str, Any] | None = None) -> None:
    data = {
        **result.trace.to_dict(),
        "model": result.model,
        "pipeline_default_steps": result.default_steps,
        **(extra or {}),
    }
    Path(path).write_text(json.dumps(data, indent=2) + "\n")


def filmstrip(trace: ImageTrace, path: Path, size: int = 128) -> None:
    """One tile per decision: x̂0 at that grid point, labelled with the point, the timestep and
    the action taken (needs a trace made with ``keep_frames=True``)."""
    if len(trace.frames) != len(trace.actions):
        raise ValueError("the trace holds no frames: generate with keep_frames=True")
    label_h = 30
    strip = Image.new("RGB", (size * len(trace.frames), size + label_h), "white")
    draw = ImageDraw.Draw(strip)
    for k, (frame, action, point, t) in enumerate(
        zip(trace.frames, trace.actions, trace.points, trace.timesteps, strict=True)
    ):
        tile = Image.fromarray(np.asarray(frame)).resize((size, size), Image.NEAREST)
        strip.paste(tile, (k * size, 0))
        draw.text((k * size + 4, size + 2), f"i={point} t={t}", fill="black")
        draw.text((k * size + 4, size + 15), action, fill="black")
    strip.save(path)
