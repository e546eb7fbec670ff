"""A synthetic trajectory store written with the real :class:`ShardWriter` (tests, benchmark).

Random features; components shaped like a real run (CLIP score rising with the step, stability
rising towards 1) so rewards have a sensible trade-off. Optionally one refine branch per root.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from addiffusion.datasets.store import ShardWriter
from addiffusion.diffusion import mdp

COMPONENTS = ["clip_score", "stability"]


def synthetic_info(
    n_max: int, image_dim: int, text_dim: int, warmup: int = 1, refine_k: int = 2
) -> dict[str, Any]:
    return {
        "components": list(COMPONENTS),
        "image_dim": image_dim,
        "text_dim": text_dim,
        "backbone": "synthetic",
        "scheduler": "ddim",
        "scorer": "synthetic",
        "num_train_timesteps": 1000,
        "sampler": {
            "n_max": n_max,
            "warmup": warmup,
            "refine_budget": 1,
            "refine_k": refine_k,
            "guidance_scale": 5.0,
            "height": 8,
            "width": 8,
        },
        "action_map": {name: i for i, name in enumerate(mdp.ACTION_NAMES)},
        "nfe_convention": "one denoiser evaluation per image per step",
    }


def _steps(
    eid: str, first: int, n_max: int, nfe0: int, refines: int, rng: np.random.Generator
) -> list[dict[str, Any]]:
    rows = []
    for i in range(first, n_max):
        frac = (i + 1) / n_max
        rows.append(
            {
                "episode_id": eid,
                "step": i,
                "timestep": float(1000 * (1 - i / n_max)),
                "t_frac": float(1 - i / n_max),
                "sigma": float(10 * (1 - frac) + 0.01),
                "action": mdp.STOP if i == n_max - 1 else mdp.CONTINUE,
                "behavior_prob": 1.0,
                "nfe": nfe0 + (i - first),
                "refines_used": refines,
                "wall_time_s": 0.01,
                "peak_mem_bytes": 1 << 20,
                "clip_score": float(0.3 * np.sqrt(frac) + 0.02 * rng.standard_normal()),
                "stability": float(frac + 0.01 * rng.standard_normal()),
            }
        )
    return rows


def write_synthetic_store(
    store_dir: Path,
    n_prompts: int = 6,
    seeds_per_prompt: int = 2,
    n_max: int = 5,
    image_dim: int = 8,
    text_dim: int = 4,
    shard_size: int = 4,
    heldout_every: int = 3,
    branch_step: int | None = None,
    thumbnails: bool = True,
    seed: int = 0,
) -> list[Path]:
    """Write ``n_prompts * seeds_per_prompt`` root episodes of ``n_max`` steps in shards of
    ``shard_size`` roots. Every ``heldout_every``-th prompt is heldout. With ``branch_step``,
    each root also gets a refine branch leaving at that step (steps branch_step+1..n_max-1)."""
    rng = np.random.default_rng(seed)
    info = synthetic_info(n_max, image_dim, text_dim)
    k = info["sampler"]["refine_k"]
    roots = [(p, s) for p in range(n_prompts) for s in range(seeds_per_prompt)]
    paths = []
    for shard, start in enumerate(range(0, len(roots), shard_size)):
        writer = ShardWriter(store_dir, shard, info)
        for p, s in roots[start : start + shard_size]:
            eid = f"{p:06d}-{s}"
            base = {
                "prompt_id": p,
                "prompt": f"prompt {p}",
                "category": ("simple", "hard")[p % 2],
                "split": "heldout" if p % heldout_every == heldout_every - 1 else "train",
                "seed": s,
            }
            text = rng.standard_normal(text_dim).astype(np.float32)
            episodes = [(eid, None, -1, _steps(eid, 0, n_max, 1, 0, rng))]
            if branch_step is not None:
                bid = f"{eid}-b{branch_step}"
                rows = _steps(bid, branch_step + 1, n_max, branch_step + 2 + k, 1, rng)
                episodes.append((bid, eid, branch_step, rows))
            for ep_id, parent, bstep, rows in episodes:
                n = len(rows)
                writer.add_episode(
                    episode={
                        "episode_id": ep_id,
                        **base,
                        "parent_episode_id": parent,
                        "branch_step": bstep,
                        "num_steps": n,
                    },
                    steps=rows,
                    image_features=rng.standard_normal((n, image_dim)).astype(np.float32),
                    text_features=text,
                    thumbnails=rng.integers(0, 255, (n, 4, 4, 3), dtype=np.uint8)
                    if thumbnails
                    else None,
                )
        paths.append(writer.commit())
    return paths
