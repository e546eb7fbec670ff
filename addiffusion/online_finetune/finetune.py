"""Online fine-tuning: MaskablePPO from the IQL actor on the dataset's own sampler MDP.

Output folder (``out_dir``)::

    actor.safetensors   the fine-tuned actor (MlpActor state dict; no pickle)
    manifest.json       architecture, obs dim, sha256 of actor.safetensors, provenance
    metrics.json        final metrics + one row per iteration (CleanRL-style names)
    training.csv        the per-iteration rows, for ``dvc plots``

The PPO policy starts as the offline actor (same MLP, same weights, same observation
standardisation); its value network starts as the offline run's V when ``cfg.init_critic`` (IQL
has one; BC does not). Iteration k's rollout is collected by the policy *before* its k-th update,
so iteration 1's ``charts/episodic_return`` is the IQL actor's own (sampled) return on the live
MDP.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger

from addiffusion.online_finetune.config import OnlineFinetuneConfig
from addiffusion.online_finetune.dataset_mdp import load_dataset_mdp
from addiffusion.online_finetune.env import SamplerVectorEnv
from addiffusion.online_finetune.offline_init import load_offline_networks
from addiffusion.online_finetune.ppo import actor_from_ppo, build_maskable_ppo, save_actor
from addiffusion.online_finetune.sb3_adapter import Sb3VecEnv
from addiffusion.rewards.config import RewardConfig
from addiffusion.task import check_observer, read_task

SB3_TO_CLEANRL = {
    "train/approx_kl": "losses/approx_kl",
    "train/policy_gradient_loss": "losses/policy_loss",
    "train/value_loss": "losses/value_loss",
    "train/clip_fraction": "losses/clipfrac",
    "train/explained_variance": "losses/explained_variance",
    "train/learning_rate": "charts/learning_rate",
}
LOGGED = ("charts/episodic_return", "charts/episodic_nfe", "losses/approx_kl", "losses/entropy")
"""The per-iteration line printed by ``log``."""


class _EpisodeLog(BaseCallback):
    """Collects the statistics of the episodes that finish during a rollout."""

    def __init__(self) -> None:
        super().__init__()
        self.episodes: list[dict[str, float]] = []

    def _on_step(self) -> bool:
        self.episodes += [info["episode"] for info in self.locals["infos"] if "episode" in info]
        return True


def _mean(values: list[float]) -> float | None:
    return float(np.mean(values)) if values else None


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _finite(value: Any) -> float | None:
    """SB3 reports NaN (e.g. explained variance of constant returns); JSON wants null."""
    v = float(value)
    return v if math.isfinite(v) else None


def finetune(
    dataset_dir: Path,
    offline_dir: Path,
    cfg: OnlineFinetuneConfig,
    out_dir: Path,
    *,
    rewards: RewardConfig,
    log: Any = None,
) -> dict[str, Any]:
    """Fine-tune the offline actor with MaskablePPO for ``cfg.iterations`` iterations.

    ``dataset_dir``: a built dataset (``meta/info.json`` with backbone/scheduler/scorer ids,
    sampler settings, components and their stats; an ``episodes`` table with train prompts).
    ``offline_dir``: an ``offline_rl`` run (``policy.d3`` + ``manifest.json``, algo iql or bc).
    ``rewards``: the reward definition (the ``rewards`` params section, as used offline).
    ``log``: optional ``print``-like callable for one line per iteration.
    Writes the files in the module docstring and returns the content of ``metrics.json``.
    """
    tic = time.perf_counter()
    out_dir = Path(out_dir)
    dataset_dir = Path(dataset_dir)
    # the offline run must fit the dataset's action table and observations: checked before the
    # models load
    task = read_task(dataset_dir)
    offline = load_offline_networks(Path(offline_dir), task.actions)
    check_observer(task, offline.manifest.get("observer"), f"the offline policy in {offline_dir}")
    torch.manual_seed(cfg.seed)  # before the sampler loads (open_clip draws an init), as always
    live = load_dataset_mdp(dataset_dir, cfg.device, rewards)
    task, sampler = live.task, live.sampler
    actor = offline.actor
    critic = offline.critic if cfg.init_critic else None
    env = SamplerVectorEnv(
        sampler, live.prompts, cfg.n_envs, rewards, task.component_stats, seed=cfg.seed
    )
    model = build_maskable_ppo(Sb3VecEnv(env), actor, cfg, sampler.device, critic=critic)
    model.set_logger(Logger(folder=None, output_formats=[]))  # we write our own metrics
    episodes = _EpisodeLog()
    rows: list[dict[str, Any]] = []
    for it in range(1, cfg.iterations + 1):
        # 1. rollout (n_envs * n_steps decisions) and 2. PPO update, inside one learn() call
        it_tic, nfe0 = time.perf_counter(), env.total_nfe
        episodes.episodes = []
        model.learn(cfg.steps_per_iteration, callback=episodes, reset_num_timesteps=False)
        values = dict(model.logger.name_to_value)
        model.logger.dump()  # clears the values for the next iteration
        eps = episodes.episodes
        row: dict[str, Any] = {
            "iteration": it,
            "global_step": int(model.num_timesteps),
            "charts/episodic_return": _mean([e["r"] for e in eps]),
            "charts/episodic_length": _mean([e["l"] for e in eps]),
            "charts/episodic_nfe": _mean([e["nfe"] for e in eps]),
            "charts/episodes": len(eps),
            "charts/nfe": env.total_nfe - nfe0,
            "charts/SPS": cfg.steps_per_iteration / (time.perf_counter() - it_tic),
            "losses/entropy": _finite(-float(values["train/entropy_loss"])),
        }
        row.update({new: _finite(values[old]) for old, new in SB3_TO_CLEANRL.items()})
        rows.append(row)
        if log is not None:
            log(
                f"iteration {it}/{cfg.iterations}: "
                + ", ".join(f"{k} {_fmt(row[k])}" for k in LOGGED)
            )

    final = actor_from_ppo(model, actor.spec)
    save_actor(
        final,
        task.actions,
        out_dir,
        extra={
            "source": {
                "dataset": str(dataset_dir),
                "offline": str(offline_dir),
                "backbone": task.backbone,
                "scheduler": task.scheduler,
                "scorer": task.scorer,
                "sampler": dataclasses.asdict(task.settings),
            },
            "observer": task.observer,
            "config": cfg.to_dict(),
            "rewards": rewards.to_dict(),
            "critic_init": "offline V" if critic is not None else "fresh",
        },
    )
    with_eps = [r for r in rows if r["charts/episodes"]]
    metrics = {
        "iterations": len(rows),
        "global_step": rows[-1]["global_step"],
        "seconds": round(time.perf_counter() - tic, 3),
        "charts/episodic_return_first": with_eps[0]["charts/episodic_return"] if with_eps else None,
        "charts/episodic_return_last": with_eps[-1]["charts/episodic_return"] if with_eps else None,
        "charts/episodic_nfe_last": with_eps[-1]["charts/episodic_nfe"] if with_eps else None,
        "losses/approx_kl_last": rows[-1]["losses/approx_kl"],
        "losses/entropy_last": rows[-1]["losses/entropy"],
        "history": rows,
    }
    (out_dir / "metrics.json").write_text(json.dumps(metrics, indent=2) + "\n")
    with (out_dir / "training.csv").open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows({k: "" if v is None else v for k, v in r.items()} for r in rows)
    return metrics
