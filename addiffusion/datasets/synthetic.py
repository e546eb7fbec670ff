"""A synthetic trajectory store written with the real :class:`ShardWriter` (tests, benchmark).

Random features; components shaped like a real run (CLIP score rising with the grid point,
stability rising towards 1) so rewards have a sensible trade-off. The format is the collector's
(:mod:`addiffusion.collect.collector`): roots run from grid point 0 to the last point along a path
of jumps and stop there; root ``r`` (global index over prompts x seeds) follows the stride pattern
``ROOT_PATTERNS[r % 3]`` (constant stride 1, constant stride 2, or alternating 1, 2). With
``branch_step``, a root visiting that point (not its last) forks there into the branch
``<root>-b<branch_step>``: roots with ``(r // 3) % 2 == 0`` take ``refine``, the others the
smallest jump other than their own; a branch then continues with ``jump-1`` to the end.
Each root is followed by its branch, or, with ``branches_last``, a shard holds its roots first and
then their branches (the collector's order: a batch of roots, then the branches they forked).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from addiffusion.datasets.store import ShardWriter, init_store
from addiffusion.diffusion.actions import ActionTable

COMPONENTS = ["clip_score", "stability"]
ROOT_PATTERNS: tuple[tuple[int, ...], ...] = ((1,), (2,), (1, 2))
"""Stride patterns of the roots (cycled along the path)."""
STRIDES = (1, 2, 4)


def synthetic_table(
    n_max: int,
    strides: Sequence[int] = STRIDES,
    warmup: int = 1,
    refine_budget: int = 1,
    refine_k: int = 2,
) -> ActionTable:
    return ActionTable.build(strides, n_max, warmup, refine_budget, refine_k)


def synthetic_info(
    n_max: int,
    image_dim: int,
    text_dim: int,
    warmup: int = 1,
    refine_k: int = 2,
    strides: Sequence[int] = STRIDES,
) -> dict[str, Any]:
    table = synthetic_table(n_max, strides, warmup, 1, refine_k)
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
            "strides": list(table.strides),
            "warmup": warmup,
            "refine_budget": table.refine_budget,
            "refine_k": refine_k,
            "guidance_scale": 5.0,
            "height": 8,
            "width": 8,
        },
        "actions": table.to_dict(),
        "nfe_convention": "one denoiser evaluation per image per step",
    }


def root_path(table: ActionTable, pattern: Sequence[int]) -> tuple[list[int], list[int]]:
    """Grid points and action ids of a root following ``pattern`` (cycled), stopping last."""
    points, actions = [0], []
    while points[-1] < table.n_max - 1:
        a = table.jump(pattern[len(actions) % len(pattern)])
        actions.append(a)
        points.append(int(table.target(points[-1], a)))
    return points, [*actions, table.stop]


def continuation(table: ActionTable, first: int) -> tuple[list[int], list[int]]:
    """``jump-1`` from ``first`` to the last point, then stop."""
    points = list(range(first, table.n_max))
    return points, [table.jump(1)] * (len(points) - 1) + [table.stop]


def _rows(
    eid: str,
    points: list[int],
    actions: list[int],
    nfe0: int,
    refines: int,
    table: ActionTable,
    probs: list[float],
    rng: np.random.Generator,
) -> list[dict[str, Any]]:
    n_max = table.n_max
    cost = table.nfe_cost
    rows, nfe = [], nfe0
    for j, (i, a) in enumerate(zip(points, actions, strict=True)):
        frac = (i + 1) / n_max
        rows.append(
            {
                "episode_id": eid,
                "step": i,
                "timestep": float(1000 * (1 - i / n_max)),
                "t_frac": float(1 - i / n_max),
                "sigma": float(10 * (1 - frac) + 0.01),
                "action": a,
                "behavior_prob": probs[j],
                "nfe": nfe,
                "refines_used": refines,
                "wall_time_s": 0.01,
                "peak_mem_bytes": 1 << 20,
                "clip_score": float(0.3 * np.sqrt(frac) + 0.02 * rng.standard_normal()),
                "stability": float(frac + 0.01 * rng.standard_normal()),
            }
        )
        nfe += int(cost[a])
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
    branches_last: bool = False,
    prompts: Sequence[str] | None = None,
) -> list[Path]:
    """Write ``n_prompts * seeds_per_prompt`` roots (see the module docstring) in shards of
    ``shard_size`` roots. Every ``heldout_every``-th prompt is heldout. Like a collector, it
    records the store's plan first (``collect.json``: these settings, the number of shards).
    ``prompts``: the text of each prompt id (default ``prompt <id>``)."""
    rng = np.random.default_rng(seed)
    info = synthetic_info(n_max, image_dim, text_dim)
    table = ActionTable.from_dict(info["actions"])
    cost = table.nfe_cost
    roots = [(p, s) for p in range(n_prompts) for s in range(seeds_per_prompt)]
    settings = dict(
        n_prompts=n_prompts,
        seeds_per_prompt=seeds_per_prompt,
        n_max=n_max,
        image_dim=image_dim,
        text_dim=text_dim,
        shard_size=shard_size,
        heldout_every=heldout_every,
        branch_step=branch_step,
        thumbnails=thumbnails,
        seed=seed,
        branches_last=branches_last,
        prompts=list(prompts) if prompts is not None else None,
    )
    init_store(store_dir, {"synthetic": settings}, -(-len(roots) // shard_size))

    def add(
        writer: ShardWriter, episode: dict[str, Any], rows: list[dict[str, Any]], text: np.ndarray
    ) -> None:
        n = len(rows)
        writer.add_episode(
            episode={**episode, "num_steps": n},
            steps=rows,
            image_features=rng.standard_normal((n, image_dim)).astype(np.float32),
            text_features=text,
            thumbnails=rng.integers(0, 255, (n, 4, 4, 3), dtype=np.uint8) if thumbnails else None,
        )

    paths = []
    for shard, start in enumerate(range(0, len(roots), shard_size)):
        writer = ShardWriter(store_dir, shard, info)
        deferred: list[Any] = []  # branches written after the shard's roots (branches_last)
        for r in range(start, min(start + shard_size, len(roots))):
            p, s = roots[r]
            eid = f"{p:06d}-{s}"
            base = {
                "prompt_id": p,
                "prompt": prompts[p] if prompts is not None else f"prompt {p}",
                "category": ("simple", "hard")[p % 2],
                "split": "heldout" if p % heldout_every == heldout_every - 1 else "train",
                "seed": s,
            }
            text = rng.standard_normal(text_dim).astype(np.float32)
            pattern = ROOT_PATTERNS[r % len(ROOT_PATTERNS)]
            points, actions = root_path(table, pattern)
            prob = 1.0 if len(pattern) == 1 else 1.0 / len(table.jumps)
            root_rows = _rows(eid, points, actions, 1, 0, table, [prob] * len(points), rng)
            root = {
                "episode_id": eid,
                **base,
                "parent_episode_id": None,
                "branch_step": -1,
                "branch_action": -1,
            }
            episodes = [(root, root_rows, text)]
            if branch_step is not None and branch_step in points[:-1]:
                j = points.index(branch_step)
                if (r // len(ROOT_PATTERNS)) % 2 == 0:
                    b_action, refines = table.refine, 1
                else:
                    b_action, refines = min(a for a in table.jumps if a != actions[j]), 0
                first = int(table.target(branch_step, b_action))
                b_points, b_actions = continuation(table, first)
                nfe0 = root_rows[j]["nfe"] + int(cost[b_action])
                bid = f"{eid}-b{branch_step}"
                probs = [1.0] * len(b_points)
                b_rows = _rows(bid, b_points, b_actions, nfe0, refines, table, probs, rng)
                branch = {
                    "episode_id": bid,
                    **base,
                    "parent_episode_id": eid,
                    "branch_step": branch_step,
                    "branch_action": b_action,
                }
                (deferred if branches_last else episodes).append((branch, b_rows, text))
            for episode, rows, txt in episodes:
                add(writer, episode, rows, txt)
        for episode, rows, txt in deferred:
            add(writer, episode, rows, txt)
        paths.append(writer.commit())
    return paths
