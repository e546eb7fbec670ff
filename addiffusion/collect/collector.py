"""Collect denoising trajectories under a behaviour policy into the sharded trajectory store.

Every root episode runs from grid point 0 to the last point ``n_max - 1`` along a path of jumps
(:mod:`addiffusion.diffusion.actions`) and records, at every visited point, the raw reward
components and CLIP features of x̂0, so one trajectory holds the outcome of every stop decision
on its path (stopping at point i = decoding x̂0_i). The behaviour policy mixes the fixed
schedules (a constant stride, ``const_stride_prob`` of the roots) with per-point random strides,
so that the data covers many schedules. Episodes are ordered globally (prompt × seed) and cut into
shards of ``shard_size``; rank r of W processes writes shards r, r+W, ... under a lock of its rank;
a restarted collector skips complete shards, so every episode lands exactly once, and refuses a
store collected with other settings (:mod:`addiffusion.collect.resume`).

Branches, stored generically as (parent, step, action): at sampled points i of a root a fork of
the episode takes another action (another jump, or refine) and continues at random strides to
the end. It is stored in the root's shard as its own episode ``<root id>-b<i>`` with
``parent_episode_id = <root id>``, ``branch_step = i`` and ``branch_action`` = the action's id;
its first row is the state the action led to. A consumer rebuilds the branch transition as

    (s_i, branch_action, s') = (root row (parent_episode_id, step = branch_step),
                                branch_action, the branch's first row),

with behaviour probability ``branch_prob`` × 1 / (number of alternative actions); every other
row's ``action`` and ``behavior_prob`` are the behaviour policy's (conditional on the root's
mode, constant or random strides).
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
from addiffusion.collect.resume import RankLock, check_store_config, episode_config, plan_sha256
from addiffusion.datasets.store import ShardWriter, completed_shards
from addiffusion.diffusion.actions import ActionTable
from addiffusion.diffusion.profile import BlockProfile, BlockProfiler
from addiffusion.diffusion.sampler import Episode, StepRecord, StepwiseSampler
from addiffusion.task import make_sampler

NFE_CONVENTION = (
    "one denoiser evaluation per image per step; CFG's two branches batched, counted once"
)

BEHAVIOR_POLICY = (
    "roots run from point 0 to the last point n_max-1 and stop there (earlier stops are "
    "counterfactual); a fraction const_stride_prob of the roots keeps one stride drawn uniformly "
    "from the jump strides (behavior_prob 1), the others draw a stride uniformly at every point "
    "(behavior_prob 1/len(strides)); at each point where stop is legal a root forks with "
    "probability branch_prob into a branch '<root>-b<i>' that takes another legal jump or refine "
    "(uniformly) and continues at random strides; at most max_branches per root, none from branches"
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
    return make_sampler(
        cfg.model,
        cfg.scheduler,
        cfg.scorer,
        cfg.sampler,
        extra_components(cfg),
        extra_scorer_models(cfg),
        cfg.device,
        cfg.drop_components,
        cfg.preview,
    )


def store_config(cfg: CollectConfig, specs: list[EpisodeSpec]) -> dict:
    """What a store's episodes are defined by (the store manifest's config; see
    :mod:`addiffusion.collect.resume`): the episode keys of ``cfg`` and a hash of the plan."""
    plan = [(s.episode_id, s.prompt.text, s.seed, s.prompt.split) for s in specs]
    return {**episode_config(cfg), "plan_sha256": plan_sha256(plan)}


def shard_info(cfg: CollectConfig, sampler: StepwiseSampler, config: dict | None = None) -> dict:
    return {
        # The store's config (its manifest), so that a shard on its own says where it belongs.
        "collect_config": config if config is not None else episode_config(cfg),
        "components": sampler.component_names,
        "image_dim": sampler.scorer.dim,
        "text_dim": sampler.scorer.dim,
        "backbone": cfg.model,
        "scheduler": cfg.scheduler,
        "drop_components": list(cfg.drop_components),
        "scorer": cfg.scorer,
        # The observations' decoder (the sampler settings say whether it is used).
        "preview": cfg.preview if cfg.observe_with == "preview" else "",
        "extra_scorer_models": extra_scorer_models(cfg),
        "num_train_timesteps": sampler.num_train_timesteps,
        # Every SamplerSettings field, so a consumer rebuilds the exact sampler.
        "sampler": dataclasses.asdict(cfg.sampler),
        "family": sampler.family,
        "refine": REFINE_DEFINITION,
        "actions": sampler.table.to_dict(),
        "nfe_convention": NFE_CONVENTION,
        "behavior_policy": {
            "description": BEHAVIOR_POLICY,
            "const_stride_prob": cfg.const_stride_prob,
            "branch_prob": cfg.branch_prob,
            "max_branches": cfg.max_branches,
        },
    }


@dataclass
class Trace:
    """One recorded episode (a root or a branch): its step records, batch rows and actions."""

    episode_id: str
    spec: EpisodeSpec
    parent_id: str | None
    branch_step: int
    branch_action: int
    text_features: np.ndarray  # (D_txt,)
    rows: list[tuple[StepRecord, int, int]] = field(default_factory=list)  # record, row, batch size
    actions: list[int] = field(default_factory=list)  # action taken at each row
    probs: list[float] = field(default_factory=list)  # its behaviour probability
    blocks: list[BlockProfile | None] = field(default_factory=list)  # each row's block profile


class Behaviour:
    """The behaviour policy of one root (and its branches), seeded by the episode, so choices never
    depend on batching or the number of processes (see :data:`BEHAVIOR_POLICY`)."""

    def __init__(self, cfg: CollectConfig, table: ActionTable, spec: EpisodeSpec) -> None:
        self.cfg, self.table = cfg, table
        self.rng = np.random.default_rng([cfg.seed, spec.seed, 0xB4A])
        jumps = table.jumps
        self.const = (
            int(self.rng.choice(jumps)) if self.rng.random() < cfg.const_stride_prob else None
        )
        self.branches_left = cfg.max_branches

    def root_action(self, legal: np.ndarray) -> tuple[int, float]:
        """(action, behaviour probability) of the root at a point with legal actions ``legal``."""
        t = self.table
        if not legal[list(t.jumps)].any():
            return t.stop, 1.0
        if self.const is not None:
            return self.const, 1.0
        return self.random_jump()

    def random_jump(self) -> tuple[int, float]:
        jumps = self.table.jumps
        return int(self.rng.choice(jumps)), 1.0 / len(jumps)

    def branch_action(self, legal: np.ndarray, taken: int) -> int | None:
        """An alternative action to branch into at this point, or None (no branch)."""
        t = self.table
        if self.branches_left == 0 or not legal[t.stop] or self.cfg.branch_prob == 0:
            return None
        if self.rng.random() >= self.cfg.branch_prob:
            return None
        alt = [a for a in np.flatnonzero(legal) if a not in (taken, t.stop)]
        if not alt:
            return None
        self.branches_left -= 1
        return int(self.rng.choice(alt))


def _end(episodes: list[Episode]) -> None:
    # Stop without sampler.stop's final decode: the last point's x̂0 is already recorded.
    for ep in episodes:
        ep.done = True


def _drive(
    sampler: StepwiseSampler,
    episodes: list[Episode],
    traces: list[Trace],
    choose: list,
    rec: StepRecord,
    on_row: object = None,
    profiler: BlockProfiler | None = None,
    prof: BlockProfile | None = None,
) -> None:
    """Run B episodes until each reaches the last point, recording every visited point.
    ``choose[b](legal) -> (action, prob)``; ``on_row(b, legal, action)`` may fork a branch;
    ``prof``: the block profile of ``rec`` (``profiler`` profiles the later records)."""
    live = list(range(len(episodes)))
    rows = list(range(len(episodes)))  # row of each live episode in ``rec``
    while live:
        legal = sampler.action_masks([episodes[b] for b in live])
        acts = []
        for pos, b in enumerate(live):
            traces[b].rows.append((rec, rows[pos], len(live)))
            traces[b].blocks.append(prof)
            a, p = choose[b](legal[pos])
            traces[b].actions.append(a)
            traces[b].probs.append(p)
            acts.append(a)
            if on_row is not None:
                on_row(b, legal[pos], a)
        going = [(b, a) for b, a in zip(live, acts, strict=True) if a != sampler.table.stop]
        _end([episodes[b] for b, a in zip(live, acts, strict=True) if a == sampler.table.stop])
        if not going:
            break
        live = [b for b, _ in going]
        out = sampler.apply([episodes[b] for b in live], [a for _, a in going])
        rec, rows = out.record, list(range(len(live)))
        prof = profiler.take() if profiler is not None else None


def run_with_branches(
    sampler: StepwiseSampler,
    cfg: CollectConfig,
    specs: list[EpisodeSpec],
    profiler: BlockProfiler | None = None,
) -> list[Trace]:
    """Behaviour policy: every root runs to the last point (stop there); at sampled points a fork
    takes another action and continues at random strides as a branch. Returns the roots followed
    by their branches. ``profiler`` (hooked on ``sampler.denoiser``): profile every step."""
    table = sampler.table
    if profiler is not None:
        profiler.take()  # drop calls made before this batch
    episodes, rec = sampler.start([s.prompt.text for s in specs], [s.seed for s in specs])
    prof = profiler.take() if profiler is not None else None
    text = torch.stack([ep.text_features for ep in episodes]).cpu().numpy()
    roots = [Trace(s.episode_id, s, None, -1, -1, text[b]) for b, s in enumerate(specs)]
    policies = [Behaviour(cfg, table, s) for s in specs]
    forks: list[tuple[int, int, int, Episode]] = []  # (root, step, action, episode there)

    def on_row(b: int, legal: np.ndarray, taken: int) -> None:
        alt = policies[b].branch_action(legal, taken)
        if alt is not None:
            forks.append((b, episodes[b].step, alt, sampler.fork([episodes[b]])[0]))

    _drive(sampler, episodes, roots, [p.root_action for p in policies], rec, on_row, profiler, prof)
    branches: list[Trace] = []
    for j in range(0, len(forks), cfg.batch_size):
        chunk = forks[j : j + cfg.batch_size]
        eps = [ep for *_, ep in chunk]
        traces = [
            Trace(f"{specs[b].episode_id}-b{i}", specs[b], specs[b].episode_id, i, a, text[b])
            for b, i, a, _ in chunk
        ]
        out = sampler.apply(eps, [a for _, _, a, _ in chunk])
        prof = profiler.take() if profiler is not None else None

        def random_then_stop(legal: np.ndarray, b: int) -> tuple[int, float]:
            if not legal[list(table.jumps)].any():
                return table.stop, 1.0
            return policies[b].random_jump()

        choose = [(lambda legal, b=b: random_then_stop(legal, b)) for b, *_ in chunk]
        _drive(sampler, eps, traces, choose, out.record, None, profiler, prof)
        branches.extend(traces)
    return roots + branches


def _write_trace(
    writer: ShardWriter, cfg: CollectConfig, trace: Trace, timings: bool = True
) -> None:
    steps = []
    n = len(trace.rows)
    blocks = trace.blocks or [None] * n
    for (r, b, batch), action, prob, prof in zip(
        trace.rows, trace.actions, trace.probs, blocks, strict=True
    ):
        row = {
            "episode_id": trace.episode_id,
            "step": int(r.step[b]),
            "timestep": float(r.timestep[b]),
            "t_frac": float(r.t_frac[b]),
            "sigma": float(r.sigma[b]),
            "action": action,
            "behavior_prob": prob,
            "nfe": int(r.nfe[b]),
            "refines_used": int(r.refines_used[b]),
            # A batched step's cost, shared evenly by its episodes.
            "wall_time_s": r.wall_time_s / batch if timings else 0.0,
            "peak_mem_bytes": r.peak_mem_bytes if timings else 0,
        }
        row.update({k: float(v[b]) for k, v in r.components.items()})
        if prof is not None:
            # The hooks reset CUDA's peak statistics per block: fold their peaks back in.
            row["peak_mem_bytes"] = max(r.peak_mem_bytes, prof.cuda_peak) if timings else 0
            row["block_time_s"] = (prof.times_s / batch * timings).tolist()
            row["block_peak_mem_bytes"] = (prof.peak_bytes * timings).tolist()
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
            "branch_action": trace.branch_action,
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
    cfg: CollectConfig,
    store_dir: Path,
    rank: int = 0,
    world_size: int = 1,
    progress: bool = True,
    record_timings: bool = True,
) -> CollectSummary:
    """Collect this rank's shards into ``store_dir``, skipping shards already complete.

    Holds the rank's lock and refuses a store collected with other settings
    (:mod:`addiffusion.collect.resume`). ``record_timings=False`` writes 0 for ``wall_time_s``
    and ``peak_mem_bytes``, the only columns that differ between two runs of the same seed on the
    same machine: the shards are then byte-identical.
    """
    tic = time.perf_counter()
    torch.manual_seed(cfg.seed)
    specs = plan_episodes(cfg)
    shards = [specs[i : i + cfg.shard_size] for i in range(0, len(specs), cfg.shard_size)]
    config = store_config(cfg, specs)
    with RankLock(store_dir, rank, world_size):
        check_store_config(store_dir, config, len(shards))
        done = completed_shards(store_dir)
        mine = [k for k in range(len(shards)) if k % world_size == rank]
        todo = [k for k in mine if k not in done]
        summary = dict(shards_written=0, episodes=0, steps=0)
        if todo:
            sampler = build_sampler(cfg)
            info = shard_info(cfg, sampler, config)
            profiler = BlockProfiler(sampler.denoiser) if cfg.profile_blocks else None
            if profiler is not None:
                info["block_profile"] = profiler.layout.to_dict()
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
                    for trace in run_with_branches(sampler, cfg, batch, profiler):
                        _write_trace(writer, cfg, trace, record_timings)
                        summary["episodes"] += 1
                        summary["steps"] += len(trace.rows)
                    bar.update(len(batch))
                writer.commit()
                summary["shards_written"] += 1
            bar.close()
    return CollectSummary(
        shards_skipped=len(mine) - len(todo), seconds=time.perf_counter() - tic, **summary
    )
