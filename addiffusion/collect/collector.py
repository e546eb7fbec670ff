"""Collect full denoising trajectories into the sharded trajectory store.

Every episode runs to ``n_max`` and records, at every step, the raw reward components and CLIP
features of x̂0, so one trajectory holds the outcome of every stop decision (stopping at i =
decoding x̂0_i). Episodes are ordered globally (prompt × seed) and cut into shards of
``shard_size``; rank r of W processes writes shards r, r+W, ...; a restarted collector skips
complete shards, so every episode lands exactly once.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from addiffusion.collect.config import CollectConfig
from addiffusion.collect.prompts import PromptRecord, load_prompts
from addiffusion.datasets.store import ShardWriter, completed_shards
from addiffusion.diffusion import mdp
from addiffusion.diffusion.backbone import load_pipeline, resolve_device
from addiffusion.diffusion.sampler import ExtraScorer, StepRecord, StepwiseSampler
from addiffusion.rewards.clip import ClipScorer

NFE_CONVENTION = (
    "one denoiser evaluation per image per step; CFG's two branches batched, counted once"
)


@dataclass(frozen=True)
class EpisodeSpec:
    episode_id: str
    prompt: PromptRecord
    seed: int


@dataclass(frozen=True)
class CollectSummary:
    shards_written: int
    shards_skipped: int
    episodes: int
    steps: int
    seconds: float


def plan_episodes(cfg: CollectConfig) -> list[EpisodeSpec]:
    """The global, deterministic episode order (independent of the number of processes)."""
    prompts = load_prompts(cfg.prompts, cfg.n_prompts, cfg.heldout_fraction, cfg.seed)
    return [
        EpisodeSpec(f"{p.prompt_id:06d}-{seed}", p, seed)
        for p in prompts
        for seed in (
            cfg.seed * 1_000_003 + p.prompt_id * cfg.seeds_per_prompt + s
            for s in range(cfg.seeds_per_prompt)
        )
    ]


def extra_scorers_for(cfg: CollectConfig) -> dict[str, ExtraScorer]:
    """The shapes world's exact verifier is a raw component whenever its prompts are used."""
    if cfg.prompts != "shapes":
        return {}
    from addiffusion.worlds.shapes.verifier import verify

    return {"verifier": lambda images, prompts: verify(images, list(prompts)).score}


def build_sampler(cfg: CollectConfig) -> StepwiseSampler:
    device = resolve_device(cfg.device)
    pipe = load_pipeline(cfg.model, cfg.scheduler, str(device))
    return StepwiseSampler(
        pipe, ClipScorer(cfg.scorer, device), cfg.sampler, extra_scorers_for(cfg)
    )


def shard_info(cfg: CollectConfig, sampler: StepwiseSampler) -> dict:
    s = cfg.sampler
    return {
        "components": sampler.component_names,
        "image_dim": sampler.scorer.dim,
        "text_dim": sampler.scorer.dim,
        "backbone": cfg.model,
        "scheduler": cfg.scheduler,
        "scorer": cfg.scorer,
        "num_train_timesteps": sampler.num_train_timesteps,
        "sampler": {
            "n_max": s.n_max,
            "warmup": s.warmup,
            "refine_budget": s.refine_budget,
            "refine_k": s.refine_k,
            "guidance_scale": s.guidance_scale,
            "height": s.height,
            "width": s.width,
        },
        "action_map": {name: i for i, name in enumerate(mdp.ACTION_NAMES)},
        "nfe_convention": NFE_CONVENTION,
        "behavior_policy": "continue to n_max (stops are counterfactual)",
    }


def run_episodes(
    sampler: StepwiseSampler, specs: list[EpisodeSpec]
) -> tuple[list[StepRecord], np.ndarray]:
    """Run a batch of B episodes to ``n_max``: the n_max per-step records and the (B, D_txt)
    text features."""
    episodes, record = sampler.start([s.prompt.text for s in specs], [s.seed for s in specs])
    records = [record]
    for _ in range(sampler.settings.n_max - 1):
        records.append(sampler.advance(episodes))
    sampler.stop(episodes)
    return records, torch.stack([ep.text_features for ep in episodes]).cpu().numpy()


def _write_batch(
    writer: ShardWriter,
    cfg: CollectConfig,
    specs: list[EpisodeSpec],
    records: list[StepRecord],
    text_features: np.ndarray,
) -> None:
    n = len(records)
    for b, spec in enumerate(specs):
        steps = []
        for i, r in enumerate(records):
            row = {
                "episode_id": spec.episode_id,
                "step": int(r.step[b]),
                "timestep": float(r.timestep[b]),
                "t_frac": float(r.t_frac[b]),
                "sigma": float(r.sigma[b]),
                "action": mdp.STOP if i == n - 1 else mdp.CONTINUE,
                "behavior_prob": 1.0,
                "nfe": int(r.nfe[b]),
                "refines_used": int(r.refines_used[b]),
                # A batched step's cost, shared evenly by its episodes.
                "wall_time_s": r.wall_time_s / len(specs),
                "peak_mem_bytes": r.peak_mem_bytes,
            }
            row.update({k: float(v[b]) for k, v in r.components.items()})
            steps.append(row)
        writer.add_episode(
            episode={
                "episode_id": spec.episode_id,
                "prompt_id": spec.prompt.prompt_id,
                "prompt": spec.prompt.text,
                "category": spec.prompt.category,
                "split": spec.prompt.split,
                "seed": spec.seed,
                "parent_episode_id": None,
                "branch_step": -1,
                "num_steps": n,
            },
            steps=steps,
            image_features=np.stack([r.image_features[b] for r in records]),
            text_features=text_features[b],
            thumbnails=np.stack([r.images[b] for r in records]) if cfg.record_thumbnails else None,
            latents=np.stack([r.x0_latents[b] for r in records]) if cfg.record_latents else None,
        )


def collect(
    cfg: CollectConfig, store_dir: Path, rank: int = 0, world_size: int = 1, progress: bool = True
) -> CollectSummary:
    """Collect this rank's shards into ``store_dir``, skipping shards already complete."""
    tic = time.perf_counter()
    torch.manual_seed(cfg.seed)
    specs = plan_episodes(cfg)
    shards = [specs[i : i + cfg.shard_size] for i in range(0, len(specs), cfg.shard_size)]
    done = completed_shards(store_dir)
    mine = [k for k in range(len(shards)) if k % world_size == rank]
    todo = [k for k in mine if k not in done]
    summary = dict(shards_written=0, episodes=0, steps=0)
    if todo:
        sampler = build_sampler(cfg)
        info = shard_info(cfg, sampler)
        bar = tqdm(
            total=sum(len(shards[k]) for k in todo),
            unit="episode",
            disable=not progress,
            desc=f"collect rank {rank}",
        )
        for k in todo:
            writer = ShardWriter(store_dir, k, info)
            for j in range(0, len(shards[k]), cfg.batch_size):
                batch = shards[k][j : j + cfg.batch_size]
                records, text = run_episodes(sampler, batch)
                _write_batch(writer, cfg, batch, records, text)
                summary["episodes"] += len(batch)
                summary["steps"] += len(batch) * len(records)
                bar.update(len(batch))
            writer.commit()
            summary["shards_written"] += 1
        bar.close()
    return CollectSummary(
        shards_skipped=len(mine) - len(todo), seconds=time.perf_counter() - tic, **summary
    )
