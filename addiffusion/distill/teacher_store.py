"""Teacher trajectories in the trajectory store, for an offline warm-start of the student.

:func:`write_teacher_trajectories` runs the teacher on its own (train prompts x seeds, the pair's
``n_steps`` timesteps) and records every step as a store episode: stride-1 jumps then a stop (the
action table of :mod:`addiffusion.diffusion.actions`), the x̂0 latents (float16, the store's
``latents`` array), CLIP features and CLIP score of the decoded x̂0. Shards go through
:class:`addiffusion.datasets.store.ShardWriter` (atomic, checksummed); ``shard.json`` records the
timesteps, guidance and teacher under ``distill_teacher``.

:func:`read_teacher_trajectories` reads them back for a pair: the timesteps must equal the
pair's (:func:`addiffusion.distill.pair.align_timesteps`). The states are rebuilt exactly as they
were visited, since the sampler's step is deterministic: ``x_0`` is the episode seed's noise and
``x_{i+1}`` the solver step from ``x_i`` with the prediction that gives the recorded x̂0_i
(:func:`output_from_x0`, the inverse of ``predict_x0``).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from addiffusion.config import UserError
from addiffusion.datasets.store import ShardWriter, init_store, read_store
from addiffusion.diffusion import backbone
from addiffusion.diffusion.actions import ActionTable
from addiffusion.diffusion.backbone import NoiseSpace
from addiffusion.diffusion.solvers import SolverHistory, solver_step
from addiffusion.distill.losses import marginal
from addiffusion.distill.pair import (
    Pair,
    align_timesteps,
    decode,
    draw_noise,
    encode,
    guided,
    initial_latents,
)

INFO_KEY = "distill_teacher"


def output_from_x0(
    scheduler: object, space: NoiseSpace, i: int, x: torch.Tensor, x0: torch.Tensor
) -> torch.Tensor:
    """The model output (the scheduler's prediction type) whose x̂0 at ``x``, step ``i`` is
    ``x0`` (both (B, C, h, w)); float32."""
    x, x0 = x.float(), x0.float()
    a, s = (v.to(x.device) for v in marginal(scheduler, space, i))
    if space == "flow":
        return (x - x0) / s
    kind = scheduler.config.prediction_type
    eps = (x - a * x0) / s
    if kind == "epsilon":
        return eps
    if kind == "v_prediction":
        return a * eps - s * x0
    if kind == "sample":
        return x0
    raise ValueError(f"prediction_type {kind!r} is not epsilon, v_prediction or sample")


def write_teacher_trajectories(
    pair: Pair,
    scorer: object,
    prompts: list[tuple[int, str, str]],
    seeds: list[int],
    store: Path,
    teacher_id: str,
    shard_size: int = 32,
    batch_size: int = 16,
) -> int:
    """Record the teacher's own trajectories of ``prompts`` ((prompt_id, text, category)) x
    ``seeds`` into ``store``; returns the number of shards written. A store holding another
    plan (prompts, seeds, timesteps, teacher) is refused
    (:class:`addiffusion.datasets.store.StoreMismatch`)."""
    n = pair.n_steps
    table = ActionTable.build((1,), n, 1, 0, 1)
    items = [(p, s) for p in prompts for s in seeds]
    timesteps = [int(t) for t in pair.timesteps]
    plan = {
        "kind": "distill teacher trajectories",
        "teacher": teacher_id,
        "timesteps": timesteps,
        "guidance_scale": pair.guidance_scale,
        "items": [[p[0], p[1], s] for p, s in items],
    }
    n_shards = -(-len(items) // shard_size)
    init_store(store, plan, n_shards)
    info = {
        "components": ["clip_score"],
        "image_dim": scorer.dim,
        "text_dim": scorer.dim,
        "backbone": teacher_id,
        "actions": table.to_dict(),
        INFO_KEY: {"timesteps": timesteps, "guidance_scale": pair.guidance_scale, "n_steps": n},
    }
    model = backbone.denoiser_of(pair.teacher)
    for k in range(n_shards):
        if (store / f"shard-{k:05d}").is_dir():
            continue  # complete (resumable, as collect)
        writer = ShardWriter(store, k, info)
        chunk = items[k * shard_size : (k + 1) * shard_size]
        for start in range(0, len(chunk), batch_size):
            part = chunk[start : start + batch_size]
            texts = [p[1] for p, _ in part]
            cond = encode(pair, texts)
            x = initial_latents(pair, draw_noise(pair, [s for _, s in part]))
            history = SolverHistory()
            x0s, feats, scores = [], [], []
            text_feats = scorer.encode_text(texts)
            with torch.no_grad():
                for i in range(n):
                    out = guided(
                        model,
                        pair.teacher,
                        pair.scheduler,
                        pair.space,
                        x,
                        i,
                        cond.teacher,
                        pair.guidance_scale,
                    )
                    x0 = backbone.predict_x0(pair.scheduler, i, pair.space, x, out)
                    f = scorer.encode_images(decode(pair, x0))
                    x0s.append(x0.half().cpu().numpy())
                    feats.append(f.cpu().numpy())
                    scores.append((f * text_feats).sum(-1).cpu().numpy())
                    x = solver_step(pair.scheduler, history, x, out.float(), i, i + 1)
            for b, ((pid, text, category), seed) in enumerate(part):
                eid = f"{pid:06d}-{seed}"
                steps = [
                    {
                        "episode_id": eid,
                        "step": i,
                        "timestep": float(timesteps[i]),
                        "t_frac": timesteps[i] / pair.scheduler.config.num_train_timesteps,
                        "sigma": backbone.vp_sigma(pair.scheduler, i, pair.space),
                        "action": table.stop if i == n - 1 else table.jump(1),
                        "behavior_prob": 1.0,
                        "nfe": i + 1,
                        "refines_used": 0,
                        "wall_time_s": 0.0,
                        "peak_mem_bytes": 0,
                        "clip_score": float(scores[i][b]),
                    }
                    for i in range(n)
                ]
                writer.add_episode(
                    {
                        "episode_id": eid,
                        "prompt_id": pid,
                        "prompt": text,
                        "category": category,
                        "split": "train",
                        "seed": seed,
                        "parent_episode_id": None,
                        "branch_step": -1,
                        "branch_action": -1,
                        "num_steps": n,
                    },
                    steps,
                    np.stack([feats[i][b] for i in range(n)]),
                    text_feats[b].cpu().numpy(),
                    latents=np.stack([x0s[i][b] for i in range(n)]),
                )
        writer.commit()
    return n_shards


@dataclass(frozen=True)
class TeacherTrajectories:
    """E teacher episodes: ``states`` (E, n, C, h, w) float32 the teacher's own x_t,
    ``targets`` (E, n, C, h, w) float32 its predictions there, ``prompts`` (E,)."""

    states: torch.Tensor
    targets: torch.Tensor
    prompts: list[str]

    def batch(
        self, rng: np.random.Generator, size: int, device: torch.device
    ) -> tuple[int, torch.Tensor, torch.Tensor, list[str]]:
        """A random grid index i and ``size`` random episodes' (x_i, teacher output, prompt)."""
        i = int(rng.integers(0, self.states.shape[1]))
        rows = rng.choice(self.states.shape[0], size=size, replace=self.states.shape[0] < size)
        idx = torch.as_tensor(rows)
        return (
            i,
            self.states[idx, i].to(device),
            self.targets[idx, i].to(device),
            [self.prompts[int(r)] for r in rows],
        )


def read_teacher_trajectories(store: Path, pair: Pair) -> TeacherTrajectories:
    """Teacher trajectories of ``store`` rebuilt for ``pair`` (see the module docstring)."""
    shards = read_store(Path(store))
    if not shards:
        raise UserError(
            f"{store} holds no complete shard: write teacher trajectories first "
            "(`addiffusion distill record`)"
        )
    states, targets, prompts = [], [], []
    for shard in shards:
        meta = shard.info.get(INFO_KEY)
        if meta is None or not shard.info.get("has_latents"):
            raise UserError(f"{shard.path} is not a distillation teacher shard (no {INFO_KEY})")
        align_timesteps(torch.as_tensor(meta["timesteps"]), pair.timesteps)
        latents = np.asarray(shard.features["latents"][...])
        steps = shard.steps.sort("feature_row")
        for ep in shard.episodes.iter_rows(named=True):
            rows = steps.filter(steps["episode_id"] == ep["episode_id"])["feature_row"].to_list()
            x = initial_latents(pair, draw_noise(pair, [ep["seed"]]))
            history = SolverHistory()
            ep_states, ep_targets = [], []
            for i, row in enumerate(rows):
                x0 = torch.from_numpy(latents[row : row + 1].astype(np.float32)).to(x.device)
                out = output_from_x0(pair.scheduler, pair.space, i, x, x0)
                ep_states.append(x)
                ep_targets.append(out)
                x = solver_step(pair.scheduler, history, x, out, i, i + 1)
            states.append(torch.cat(ep_states))
            targets.append(torch.cat(ep_targets))
            prompts.append(ep["prompt"])
    return TeacherTrajectories(torch.stack(states).cpu(), torch.stack(targets).cpu(), prompts)
