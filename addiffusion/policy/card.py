"""The model card (README.md) of a policy package, written from its config alone."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any

from huggingface_hub import ModelCard, ModelCardData

if TYPE_CHECKING:
    from addiffusion.policy.package import PolicyConfig

ALGO_NAMES = {
    "iql": "discrete Implicit Q-Learning (d3rlpy, offline)",
    "cql": "discrete Conservative Q-Learning (d3rlpy, offline)",
    "bc": "behaviour cloning (d3rlpy, offline)",
    "bcq": "discrete Batch-Constrained Q-learning (d3rlpy, offline)",
    "ppo": "MaskablePPO fine-tuning (sb3-contrib, online)",
}


def _trained_with(cfg: PolicyConfig) -> str:
    """The algorithm, and for PPO where it started (``training["init"]``, ``offline_algo``)."""
    name = ALGO_NAMES.get(cfg.algo, cfg.algo)
    if cfg.algo != "ppo":
        return name
    t = cfg.training
    if t.get("init") == "scratch":
        return f"{name} from a random init (no offline start)"
    start = t.get("offline_algo")
    return f"{name} from the offline {str(start).upper()} actor" if start else name


def _fmt(value: Any) -> str:
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _evaluation(ev: dict[str, Any]) -> str:
    if not ev:
        return "No evaluation was recorded with this package."
    metric = ev.get("metric") or "score"
    rows = [
        f"| {k} | {_fmt(ev[k])} |"
        for k in ("nfe", metric, "clip_score", "seconds_per_image")
        if k in ev
    ]
    lines = ["| quantity | value |", "|---|---|", *rows]
    f = ev.get("frontier")
    if isinstance(f, dict) and "gain" in f:
        ci = f.get("ci") or ["?", "?"]
        lines.append(
            f"| {metric} − fixed-schedule frontier at this NFE | {_fmt(f['gain'])} "
            f"(CI [{_fmt(ci[0])}, {_fmt(ci[1])}]) |"
        )
    out = "\n".join(lines)
    if isinstance(f, dict) and "gain" in f:
        verdict = "above" if f["gain"] > 0 else "below"
        out += (
            f"\n\nOn its held-out prompts this policy sits **{verdict}** the frontier of fixed "
            "short schedules (every solver, uniform and AYS grids) at equal NFE: a negative gain "
            "means a plain fixed schedule of the same cost was better."
        )
    if ev.get("best_learned_line"):
        out += f"\n\nThe eval's headline (best learned policy of that run):\n\n```\n{ev['best_learned_line']}\n```"
    return out


def _restrictions(cfg: PolicyConfig) -> str:
    """The card's sentences on an ablation policy's action space and observation (may be empty)."""
    out = []
    if cfg.combine == "bcq":
        out.append(
            f"It takes the action of highest mean Q among those its imitator finds more than "
            f"{_fmt(cfg.action_flexibility)} times as likely as its most likely one "
            f"({len(cfg.networks) - 1} Q function(s))."
        )
    if cfg.allowed_actions is not None:
        out.append(
            "Its action space is restricted: it only takes "
            + ", ".join(f"`{n}`" for n in cfg.allowed_actions)
            + " (the others stay in the table but are masked out)."
        )
    if cfg.observation_drop:
        out.append(
            "It was trained without the observation part(s) "
            + ", ".join(f"`{p}`" for p in cfg.observation_drop)
            + " (their columns were zero in its data; it ignores them)."
        )
    return ("\n\n" + " ".join(out)) if out else ""


def _networks(cfg: PolicyConfig) -> str:
    if cfg.combine == "bcq":
        return f"an imitator and {len(cfg.networks) - 1} Q function(s)"
    return f"{len(cfg.networks)} network(s)"


def model_card(cfg: PolicyConfig) -> ModelCard:
    settings = cfg.settings()
    data = ModelCardData(
        library_name="addiffusion",
        tags=["diffusion", "adaptive-sampling", "reinforcement-learning", "addiffusion"],
        # A Hub id names the base model; a local folder means nothing on the Hub.
        base_model=None if Path(cfg.backbone).exists() or "/" not in cfg.backbone else cfg.backbone,
    )
    t = cfg.training
    counts = ", ".join(
        f"{k} {t[k]}" for k in ("episodes", "root_episodes", "steps") if t.get(k) is not None
    )
    text = f"""---
{data.to_yaml()}
---

# addiffusion schedule policy ({cfg.algo})

A small policy that steers a frozen diffusion model's denoising loop: at every point of a
{settings.n_max}-point {settings.grid} grid of the **{cfg.solver}** solver it picks one of
{", ".join(f"`{n}`" for n in cfg.actions.names)} (jumps cost 1 NFE, refine {settings.refine_k + 1},
stop 0). Trained with {_trained_with(cfg)}.{_restrictions(cfg)}

## Intended backbone

- pipeline: `{cfg.backbone}` (family `{cfg.family}`; loading checks the family, the solver, the
  scorer's feature size and the action table, and names what does not match)
- scorer for the observations: open_clip `{cfg.scorer}`; their x̂0 decoded by
  {f"the preview decoder `{cfg.preview}`" if cfg.preview else "the pipeline's VAE"} (final
  images always by the VAE)
- trained at guidance {settings.guidance_scale}, {settings.height}×{settings.width}, warm-up
  {settings.warmup} point(s), refine budget {settings.refine_budget}

## Use

```python
from diffusers import DiffusionPipeline
from addiffusion.policy import AdaptiveDiffusionPipeline, AdaptivePolicy
import torch

policy = AdaptivePolicy.from_pretrained("<this folder or repo id>")
pipe = DiffusionPipeline.from_pretrained("{cfg.backbone}")
adaptive = AdaptiveDiffusionPipeline(pipe, policy)
out = adaptive("a red circle left of a blue square", generator=torch.Generator().manual_seed(0))
out.images[0].save("out.png"); print(out.traces[0].nfe, out.traces[0].actions)
```

or `addiffusion generate "a red circle left of a blue square" --policy <this folder> --out out.png`.

## Training data

Dataset `{t.get("dataset", "?")}` ({counts or "counts not recorded"}); reward components
{", ".join(t.get("components", [])) or "?"}. Behaviour policy: {t.get("behavior_policy") or "not recorded"}.

## Evaluation

{_evaluation(cfg.evaluation)}

## Files

`config.json` (the action table, observation layout, sampler settings, normalisation stats),
`model.safetensors` ({_networks(cfg)}, float32; no pickle).
"""
    return ModelCard(text)
