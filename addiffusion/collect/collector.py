"""Collect full denoising trajectories into the sharded trajectory store.

Every episode runs to ``n_max`` and records, at every step, the raw reward components and CLIP
features of x̂0, so one trajectory holds the outcome of every stop decision (stopping at i =
decoding x̂0_i). Episodes are ordered globally (prompt × seed) and cut into shards of
``shard_size``; rank r of W processes writes shards r, r+W, ...; a restarted collector skips
complete shards, so every episode lands exactly once.

Refine branches (the only action that needs new denoising): at the root's sampled steps i (see
:func:`branch_steps`) a fork of the episode takes refine and continues to ``n_max``. It is stored
in the root's shard as its own episode ``<root id>-b<i>`` with ``parent_episode_id = <root id>``
and ``branch_step = i``; its rows are steps i+1 .. n_max-1, the first being s'_{i+1}, the state
after the refine (``nfe = i + 2 + k``, ``refines_used = 1``). The root's own row at step i keeps
``action = CONTINUE`` (the root did continue). A consumer rebuilds the refine transition as

    (s_i, REFINE, s'_{i+1}) = (root row (parent_episode_id, step = branch_step),
                               action 2, branch row (episode_id, step = branch_step + 1)),

its reward from the components of those two rows and the NFE difference (1 + k), and its
behaviour probability ``info["behavior_policy"]["branch_prob"]``; the branch's later rows are
ordinary continue / stop steps.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from addiffusion.collect.config import CollectConfig
from addiffusion.collect.prompts import PromptRecord, load_prompts
from addiffusion.datasets.store import ShardWriter, completed_shards
from addiffusion.diffusion import mdp
from addiffusion.diffusion.backbone import load_pipeline, resolve_device
from addiffusion.diffusion.sampler import Episode, StepRecord, StepwiseSampler
from addiffusion.rewards.clip import ClipScorer
from addiffusion.rewards.extra import build_extra_scorers

NFE_CONVENTION = (
    "one denoiser evaluation per image per step; CFG's two branches batched, counted once"
)

BEHAVIOR_POLICY = (
    "roots continue to n_max (stop at n_max-1; earlier stops are counterfactual); where refine is "
    "legal the policy refines with probability branch_prob (recorded as a branch episode "
    "'<root>-b<i>' whose first row is the state after the refine at step i+1), else continues; "
    "at most max_branches branches per root, none from branches"
)

REFINE_DEFINITION = (
    "k re-denoise iterations at t_i inside a soft under-generation mask (cross-attention of "
    "neglected content tokens, Gaussian-blurred in latent space; outside the mask the latent is "
    "kept), then a solver step to t_{i+1}; k NFE plus the evaluation at t_{i+1}"
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


def extra_components(cfg: CollectConfig) -> list[str]:
    """The shapes world's exact verifier whenever its prompts are used, plus ``collect.scorers``."""
    return (["verifier"] if cfg.prompts == "shapes" else []) + list(cfg.scorers)


def extra_scorer_models(cfg: CollectConfig) -> dict[str, str]:
    return {
        "imagereward": cfg.imagereward,
        "pickscore": cfg.pickscore_model,
        "pickscore_processor": cfg.pickscore_processor,
    }


def build_sampler(cfg: CollectConfig) -> StepwiseSampler:
    device = resolve_device(cfg.device)
    pipe = load_pipeline(cfg.model, cfg.scheduler, str(device), drop_components=cfg.drop_components)
    extra = build_extra_scorers(extra_components(cfg), extra_scorer_models(cfg), device)
    return StepwiseSampler(pipe, ClipScorer(cfg.scorer, device), cfg.sampler, extra)


def shard_info(cfg: CollectConfig, sampler: StepwiseSampler) -> dict:
    return {
        "components": sampler.component_names,
        "image_dim": sampler.scorer.dim,
        "text_dim": sampler.scorer.dim,
        "backbone": cfg.model,
        "scheduler": cfg.scheduler,
        "drop_components": list(cfg.drop_components),
        "scorer": cfg.scorer,
        "extra_scorer_models": extra_scorer_models(cfg),
        "num_train_timesteps": sampler.num_train_timesteps,
        # Every SamplerSettings field, so a consumer rebuilds the exact sampler.
        "sampler": dataclasses.asdict(cfg.sampler),
        "family": sampler.family,
        "refine": REFINE_DEFINITION,
        "action_map": {name: i for i, name in enumerate(mdp.ACTION_NAMES)},
        "nfe_convention": NFE_CONVENTION,
        "behavior_policy": {
            "description": BEHAVIOR_POLICY,
            "branch_prob": cfg.branch_prob,
            "max_branches": cfg.max_branches,
        },
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


@dataclass
class Trace:
    """One recorded episode (a root or a refine branch): its step records and batch rows."""

    episode_id: str
    spec: EpisodeSpec
    parent_id: str | None
    branch_step: int
    text_features: np.ndarray  # (D_txt,)
    rows: list[tuple[StepRecord, int, int]] = field(default_factory=list)  # record, row, batch size


def branch_steps(cfg: CollectConfig, spec: EpisodeSpec, can_refine: bool) -> list[int]:
    """Steps of a root where the behaviour policy takes refine (a branch): each refine-legal step
    independently with probability ``branch_prob``, at most ``max_branches``. Seeded by the
    episode, so the choice never depends on batching or the number of processes."""
    if not can_refine or cfg.refine_budget == 0 or cfg.branch_prob == 0:
        return []
    rng = np.random.default_rng([cfg.seed, spec.seed, 0xB4A])
    legal = range(cfg.warmup, cfg.n_max - 1)
    return [i for i, u in zip(legal, rng.random(len(legal)), strict=True) if u < cfg.branch_prob][
        : cfg.max_branches
    ]


def _end(episodes: list[Episode]) -> None:
    # Stop without sampler.stop's final decode: the last step's x̂0 is already recorded.
    for ep in episodes:
        ep.done = True


def run_with_branches(
    sampler: StepwiseSampler, cfg: CollectConfig, specs: list[EpisodeSpec]
) -> list[Trace]:
    """Behaviour policy: every root runs to ``n_max`` (continue, stop at the end); at its sampled
    branch steps a fork of the episode takes refine and continues to ``n_max`` as a branch.
    Returns the roots followed by their branches."""
    episodes, rec = sampler.start([s.prompt.text for s in specs], [s.seed for s in specs])
    text = torch.stack([ep.text_features for ep in episodes]).cpu().numpy()
    can_refine = sampler.attention is not None
    roots = [Trace(s.episode_id, s, None, -1, text[b]) for b, s in enumerate(specs)]
    plans = [branch_steps(cfg, s, can_refine) for s in specs]
    forks: list[tuple[int, int, Episode]] = []  # (root index, step, episode at that step)
    n = cfg.n_max
    for i in range(n):
        for b in range(len(specs)):
            roots[b].rows.append((rec, b, len(specs)))
            if i in plans[b]:
                forks.append((b, i, sampler.fork([episodes[b]])[0]))
        if i < n - 1:
            rec = sampler.advance(episodes)
    _end(episodes)
    branches: list[Trace] = []
    for j in range(0, len(forks), cfg.batch_size):
        chunk = forks[j : j + cfg.batch_size]
        eps = [ep for _, _, ep in chunk]
        traces = [
            Trace(f"{specs[b].episode_id}-b{i}", specs[b], specs[b].episode_id, i, text[b])
            for b, i, _ in chunk
        ]
        rec = sampler.refine(eps)
        live = list(range(len(eps)))
        while live:
            for pos, k in enumerate(live):
                traces[k].rows.append((rec, pos, len(live)))
            live = [k for k in live if eps[k].step < n - 1]
            if live:
                rec = sampler.advance([eps[k] for k in live])
        _end(eps)
        branches.extend(traces)
    return roots + branches


def _behavior_prob(cfg: CollectConfig, step: int, refines_used: int, action: int) -> float:
    """pi_b(action | s) of the behaviour policy "refine with probability branch_prob where refine
    is legal, else continue; stop at n_max - 1" (stops elsewhere are counterfactual, prob 0)."""
    legal = mdp.action_mask(step, cfg.n_max, cfg.warmup, refines_used, cfg.refine_budget)
    p_refine = cfg.branch_prob if legal[mdp.REFINE] else 0.0
    return {mdp.CONTINUE: 1.0 - p_refine, mdp.REFINE: p_refine, mdp.STOP: 1.0}[action]


def _write_trace(writer: ShardWriter, cfg: CollectConfig, trace: Trace) -> None:
    steps = []
    n = len(trace.rows)
    for r, b, batch in trace.rows:
        step, used = int(r.step[b]), int(r.refines_used[b])
        action = mdp.STOP if step == cfg.n_max - 1 else mdp.CONTINUE
        row = {
            "episode_id": trace.episode_id,
            "step": step,
            "timestep": float(r.timestep[b]),
            "t_frac": float(r.t_frac[b]),
            "sigma": float(r.sigma[b]),
            "action": action,
            "behavior_prob": _behavior_prob(cfg, step, used, action),
            "nfe": int(r.nfe[b]),
            "refines_used": used,
            # A batched step's cost, shared evenly by its episodes.
            "wall_time_s": r.wall_time_s / batch,
            "peak_mem_bytes": r.peak_mem_bytes,
        }
        row.update({k: float(v[b]) for k, v in r.components.items()})
        steps.append(row)
    spec = trace.spec
    writer.add_episode(
        episode={
            "episode_id": trace.episode_id,
            "prompt_id": spec.prompt.prompt_id,
            "prompt": spec.prompt.text,
            "category": spec.prompt.category,
            "split": spec.prompt.split,
            "seed": spec.seed,
            "parent_episode_id": trace.parent_id,
            "branch_step": trace.branch_step,
            "num_steps": n,
        },
        steps=steps,
        image_features=np.stack([r.image_features[b] for r, b, _ in trace.rows]),
        text_features=trace.text_features,
        thumbnails=np.stack([r.images[b] for r, b, _ in trace.rows])
        if cfg.record_thumbnails
        else None,
        latents=np.stack([r.x0_latents[b] for r, b, _ in trace.rows])
        if cfg.record_latents
        else None,
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
                for trace in run_with_branches(sampler, cfg, batch):
                    _write_trace(writer, cfg, trace)
                    summary["episodes"] += 1
                    summary["steps"] += len(trace.rows)
                bar.update(len(batch))
            writer.commit()
            summary["shards_written"] += 1
        bar.close()
    return CollectSummary(
        shards_skipped=len(mine) - len(todo), seconds=time.perf_counter() - tic, **summary
    )
