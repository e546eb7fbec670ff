"""Helpers of the eval tests (a unique module name, so that it cannot clash with other test
folders' helpers): a minimal built dataset over the tiny models, a small eval config and a real
offline_rl run on random transitions."""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import polars as pl

from addiffusion.diffusion.actions import ActionTable
from addiffusion.eval.config import EvalConfig

N_MAX = 4
WARMUP = 1
TABLE = ActionTable.build([1, 2], N_MAX, WARMUP, 0, 2)
OBS_DIM = 32 + 32 + 16 + 5
"""The tiny CLIP's observations: 32 image + 32 text + 16 time + 5 quality."""


def write_dataset(
    root: Path,
    models: tuple[Path, Path],
    splits: list[str],
    n_max: int = N_MAX,
    refine_budget: int = 0,
) -> Path:
    """A minimal built dataset (the ``datasets build`` layout): meta/info.json and an episodes
    table with one root episode per entry of ``splits``."""
    pipe, clip = models
    (root / "meta").mkdir(parents=True)
    info = {
        "backbone": str(pipe),
        "scheduler": "ddim",
        "scorer": str(clip),
        # The shapes world's verifier is a component whenever its captions are used.
        "components": ["clip_score", "stability", "verifier"],
        "sampler": {
            "n_max": n_max,
            "warmup": WARMUP,
            "refine_budget": refine_budget,
            "refine_k": 2,
            "strides": [1, 2],
            "guidance_scale": 5.0,
            "height": 32,
            "width": 32,
        },
        "actions": ActionTable.build([1, 2], n_max, WARMUP, refine_budget, 2).to_dict(),
        "observation": {"image_dim": 32, "text_dim": 32, "time_dim": 16, "quality_dim": 5},
        "component_stats": {
            "clip_score": {"mean": 0.0, "std": 0.1},
            "stability": {"mean": 0.5, "std": 0.2},
            "verifier": {"mean": 0.2, "std": 0.3},
        },
    }
    (root / "meta" / "info.json").write_text(json.dumps(info))
    prompts = ["a red circle", "two blue squares", "a green triangle left of a red circle"]
    cats = ["simple", "medium", "complex"]
    rows = [
        {
            "episode_id": f"{i:06d}-0",
            "prompt_id": i,
            "prompt": prompts[i % 3],
            "category": cats[i % 3],
            "split": split,
            "seed": i,
            "parent_episode_id": None,
        }
        for i, split in enumerate(splits)
    ]
    (root / "data" / "episodes").mkdir(parents=True)
    pl.DataFrame(rows).write_parquet(root / "data" / "episodes" / "mixed-00000.parquet")
    return root


def eval_cfg(**kw: object) -> EvalConfig:
    """A small eval: ddim-2 and ddim-4 on both grids, no heuristics, 2 seeds per prompt."""
    base = dict(
        baseline_steps=[2, 4],
        solvers=["ddim"],
        best_of=[],
        random_stride=False,
        stability_thresholds=[],
        clip_delta_thresholds=[],
        patience=[],
        progress_tolerances=[],
        adaptive_diffusion_thresholds=[],
        seeds_per_prompt=2,
        batch_size=4,
        bootstrap_samples=200,
        device="cpu",
    )
    base.update(kw)
    return EvalConfig(**base)  # type: ignore[arg-type]


def _random_buffer(n: int, dim: int, seed: int) -> object:
    from d3rlpy.constants import ActionSpace
    from d3rlpy.dataset import MDPDataset

    rng = np.random.default_rng(seed)
    terminals = np.zeros(n)
    terminals[3::4] = 1.0  # episodes of 4 steps
    return MDPDataset(
        rng.standard_normal((n, dim)).astype(np.float32),
        rng.integers(0, TABLE.n, n),
        rng.standard_normal(n).astype(np.float32),
        terminals,
        action_space=ActionSpace.DISCRETE,
        action_size=TABLE.n,
    )


def train_random_offline(
    out: Path,
    dim: int,
    baselines: list[str],
    observer: dict[str, str] | None = None,
    *,
    n_steps: int = 2,
    n_steps_per_epoch: int = 2,
    fqe_steps: int = 0,
    seeds: Sequence[int] = (0,),
) -> Path:
    """A real DiscreteIQL run (and ``baselines``) on random transitions of ``dim``, one per seed
    of ``seeds``. ``fqe_steps`` > 0: also a random validation split, on which the run's FQE
    values every checkpoint (``n_steps_per_epoch`` apart) and the final policy (``ope.json``)."""
    from addiffusion.offline_rl.config import ALGORITHMS, FQEParams, OfflineRLConfig
    from addiffusion.offline_rl.train import train_offline

    base = OfflineRLConfig()
    cfg = OfflineRLConfig(
        n_steps=n_steps,
        n_steps_per_epoch=n_steps_per_epoch,
        hidden_units=[8],
        baselines=baselines,
        seeds=list(seeds),
        fqe=FQEParams(n_steps=fqe_steps, batch_size=16),
        device="cpu",
        **{name: {**base.settings(name), "batch_size": 8} for name in ALGORITHMS},
    )
    val = _random_buffer(16, dim, 1) if fqe_steps > 0 else None
    train_offline(
        _random_buffer(32, dim, 0), val, cfg, out, log=False, actions=TABLE, observer=observer
    )
    return out
