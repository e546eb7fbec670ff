"""``addiffusion bench relabel --steps N``: time ``datasets relabel`` on N synthetic steps.

Outside the timing, a relabel-ready dataset is written directly in the built layout (``meta/
info.json`` + ``data/episodes`` + ``data/steps`` Parquet; no feature arrays, which relabel never
reads) — going through ShardWriter would spend minutes building Python rows for 1M steps. Roots
run ``n_max`` steps; every tenth root has a refine branch, so the refine join is timed too.
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
from addiffusion.rewards.config import RewardConfig
from addiffusion.rewards.reward import component_stats


def write_relabel_dataset(out: Path, n_steps: int, n_max: int, seed: int = 0) -> int:
    """A dataset of about ``n_steps`` steps for relabel; returns the exact step count."""
    rng = np.random.default_rng(seed)
    b = n_max // 2
    per_ten = 10 * n_max + (n_max - b - 1)
    n_roots = max(1, round(10 * n_steps / per_ten))
    roots = [f"{p:07d}-0" for p in range(n_roots)]
    branched = list(range(0, n_roots, 10))
    ids = roots + [f"{roots[p]}-b{b}" for p in branched]
    lengths = np.array([n_max] * n_roots + [n_max - b - 1] * len(branched))
    first = np.array([0] * n_roots + [b + 1] * len(branched))
    rep = np.repeat(np.arange(len(ids)), lengths)
    offset = np.arange(rep.size) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    step = first[rep] + offset
    is_branch = rep >= n_roots
    frac = (step + 1) / n_max
    steps = pl.DataFrame(
        {
            "episode_id": pl.Series(ids).gather(rep),
            "step": step.astype(np.int32),
            "nfe": (step + 1 + 2 * is_branch).astype(np.int32),
            "clip_score": (0.3 * np.sqrt(frac) + 0.02 * rng.standard_normal(step.size)).astype(
                np.float32
            ),
            "stability": (frac + 0.01 * rng.standard_normal(step.size)).astype(np.float32),
        }
    )
    parents = [None] * n_roots + [roots[p] for p in branched]
    episodes = pl.DataFrame(
        {
            "episode_id": ids,
            "parent_episode_id": pl.Series(parents, dtype=pl.String),
            "branch_step": [-1] * n_roots + [b] * len(branched),
        },
        schema_overrides={"branch_step": pl.Int32},
    )
    for name, table in (("steps", steps), ("episodes", episodes)):
        (out / "data" / name).mkdir(parents=True)
        table.write_parquet(out / "data" / name / "train-00000.parquet")
    info = synthetic_info(n_max, image_dim=8, text_dim=4)
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
        f"relabel: {n} steps ({summary['refine_edges']} refine edges), "
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
        "--n-max", type=int, default=50, help="steps per root episode (default: %(default)s)"
    )
    p.set_defaults(func=_run)
