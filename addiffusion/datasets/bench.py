"""``addiffusion bench relabel --steps N``: time ``datasets relabel`` on N synthetic steps.

Outside the timing, a relabel-ready dataset is written directly in the built layout (``meta/
info.json`` + ``data/episodes`` + ``data/steps`` Parquet; no feature arrays, which relabel never
reads) — going through ShardWriter would spend minutes building Python rows for 1M steps. Roots
jump along the grid with constant strides (steps not contiguous); every tenth root has a refine
branch, so the keyed branch join is timed too.
The timed call is the real :func:`addiffusion.datasets.relabel.relabel`.
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

import numpy as np
import polars as pl

from addiffusion.datasets.relabel import relabel
from addiffusion.datasets.synthetic import synthetic_info
from addiffusion.diffusion.actions import ActionTable
from addiffusion.rewards.config import RewardConfig
from addiffusion.rewards.reward import component_stats


def write_relabel_dataset(out: Path, n_steps: int, n_max: int, seed: int = 0) -> int:
    """A dataset of about ``n_steps`` steps for relabel; returns the exact step count. Root r
    jumps with the constant stride ``table.strides[r % len(strides)]``; every tenth root has a
    refine branch at its first point past the middle, continuing with jump-1 to the end."""
    rng = np.random.default_rng(seed)
    info = synthetic_info(n_max, image_dim=8, text_dim=4)
    table = ActionTable.from_dict(info["actions"])
    k = int(table.nfe_cost[table.refine])
    paths = []
    for s in table.strides:
        pts = list(range(0, n_max - 1, s)) + [n_max - 1]
        b = next((p for p in pts[:-1] if p >= n_max // 2), None)
        paths.append((np.array(pts), b))
    mean_len = np.mean([len(p) for p, _ in paths]) + 0.1 * (n_max / 2)
    n_roots = max(1, round(n_steps / mean_len))
    ids, parents, bsteps, step_parts, nfe_parts = [], [], [], [], []
    for r in range(n_roots):
        pts, b = paths[r % len(paths)]
        eid = f"{r:07d}-0"
        ids.append(eid)
        parents.append(None)
        bsteps.append(-1)
        step_parts.append(pts)
        nfe_parts.append(np.arange(1, len(pts) + 1))
        if r % 10 == 0 and b is not None:
            ids.append(f"{eid}-b{b}")
            parents.append(eid)
            bsteps.append(b)
            bpts = np.arange(b + 1, n_max)
            nfe_b = int(np.flatnonzero(pts == b)[0]) + 1 + k
            step_parts.append(bpts)
            nfe_parts.append(nfe_b + np.arange(len(bpts)))
    lengths = np.array([len(p) for p in step_parts])
    step = np.concatenate(step_parts)
    frac = (step + 1) / n_max
    steps = pl.DataFrame(
        {
            "episode_id": pl.Series(ids).gather(np.repeat(np.arange(len(ids)), lengths)),
            "step": step.astype(np.int32),
            "nfe": np.concatenate(nfe_parts).astype(np.int32),
            "clip_score": (0.3 * np.sqrt(frac) + 0.02 * rng.standard_normal(step.size)).astype(
                np.float32
            ),
            "stability": (frac + 0.01 * rng.standard_normal(step.size)).astype(np.float32),
        }
    )
    episodes = pl.DataFrame(
        {
            "episode_id": ids,
            "parent_episode_id": pl.Series(parents, dtype=pl.String),
            "branch_step": bsteps,
            "branch_action": [-1 if p is None else table.refine for p in parents],
        },
        schema_overrides={"branch_step": pl.Int32, "branch_action": pl.Int32},
    )
    for name, frame in (("steps", steps), ("episodes", episodes)):
        (out / "data" / name).mkdir(parents=True)
        frame.write_parquet(out / "data" / name / "train-00000.parquet")
    info["component_stats"] = component_stats({c: steps[c].to_numpy() for c in info["components"]})
    (out / "meta").mkdir()
    (out / "meta" / "info.json").write_text(json.dumps(info))
    return steps.height


def _run(args: argparse.Namespace) -> int:
    with tempfile.TemporaryDirectory(prefix="bench-relabel-") as tmp:
        root = Path(tmp)
        n = write_relabel_dataset(root / "dataset", args.steps, args.n_max)
        cfg = RewardConfig(weights={"clip_score": 1.0, "stability": 0.1}, c_nfe=0.02)
        tic = time.perf_counter()
        summary = relabel(root / "dataset", cfg, root / "rewards.parquet")
        seconds = time.perf_counter() - tic
    print(
        f"relabel: {n} steps ({summary['branch_edges']} branch edges), "
        f"{n / seconds / 1e6:.2f} M steps/s"
    )
    print(f"relabel_seconds={seconds:.2f}")
    return 0


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "relabel",
        help="time `datasets relabel` on a synthetic dataset",
        description="Writes a synthetic relabel-ready dataset of --steps steps (untimed), times "
        "`datasets relabel` on it and prints relabel_seconds=<x.xx>.",
    )
    p.add_argument("--steps", type=int, default=1_000_000, help="steps (default: %(default)s)")
    p.add_argument(
        "--n-max", type=int, default=50, help="grid points (n_max) (default: %(default)s)"
    )
    p.set_defaults(func=_run)
