"""Online fine-tuning: MaskablePPO from the IQL actor on the dataset's own sampler MDP, and the
same PPO from scratch as its baseline, for one or more seeds.

Output folder (``out_dir``), for ``cfg.seeds = [s0, s1, ...]``::

    actor.safetensors   seed s0, offline init: the fine-tuned actor (MlpActor state dict)
    manifest.json       architecture, obs dim, sha256 of actor.safetensors, provenance
                        (``init: "offline"``, ``offline_algo``, ``seed``, which offline folder)
    metrics.json        final metrics + one row per iteration (CleanRL-style names)
    training.csv        the per-iteration rows, for ``dvc plots``
    scratch/            seed s0, fresh init (``cfg.from_scratch``): the same four files
    seeds/index.json    which folder holds which run (the folder always exists)
    seeds/<s1>/         seed s1: the same files, and its own ``scratch/``
    ...

A run *from the offline actor* starts as that actor (same MLP, same weights, same observation
standardisation); its value network starts as the offline run's V when ``cfg.init_critic`` (IQL
has one; BC does not). A run *from scratch* has the same architecture (the V network's too),
hyperparameters, seed, number of environment steps and observation standardisation (the offline
run's mean/std, so that the weights' init is the only difference), with SB3's own random init of
both networks. Seed ``s`` starts from ``<offline>/seeds/<s>/`` when that folder exists (the
offline stage's layout for its further seeds), else from ``<offline>/``; the manifest says which.
Both runs obey the offline run's ablation (allowed actions, dropped observation parts:
:mod:`addiffusion.online_finetune.ablation`), so that they stay comparable.

Iteration k's rollout is collected by the policy *before* its k-th update, so iteration 1's
``charts/episodic_return`` is the initial actor's own (sampled) return on the live MDP.

Reward-hacking watch: ``charts/hacking_share`` is, among the episodes that finished during an
iteration's rollout, the share whose final image has a higher raw ``clip_score`` but a lower raw
``verifier`` than the episode's first decision point (its first x̂0); ``charts/hacked_episodes``
counts them (of ``charts/episodes``). Only a task with a ``verifier`` component (the shapes world)
has them: elsewhere both are null (empty in ``training.csv``).
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Literal

import numpy as np
import torch
from stable_baselines3.common.callbacks import BaseCallback
from stable_baselines3.common.logger import Logger

from addiffusion.online_finetune.config import OnlineFinetuneConfig
from addiffusion.online_finetune.dataset_mdp import DatasetMDP, load_dataset_mdp
from addiffusion.online_finetune.env import SamplerVectorEnv, observation_layout
from addiffusion.online_finetune.offline_init import OfflineNetworks, load_offline_networks
from addiffusion.online_finetune.ppo import actor_from_ppo, build_maskable_ppo, save_actor
from addiffusion.online_finetune.sb3_adapter import Sb3VecEnv
from addiffusion.rewards.config import RewardConfig
from addiffusion.task import check_observer, read_task

SEEDS_DIR = "seeds"
SCRATCH_DIR = "scratch"
Init = Literal["offline", "scratch"]

SB3_TO_CLEANRL = {
    "train/approx_kl": "losses/approx_kl",
    "train/policy_gradient_loss": "losses/policy_loss",
    "train/value_loss": "losses/value_loss",
    "train/clip_fraction": "losses/clipfrac",
    "train/explained_variance": "losses/explained_variance",
    "train/learning_rate": "charts/learning_rate",
}
LOGGED = (
    "charts/episodic_return",
    "charts/episodic_nfe",
    "charts/hacking_share",
    "losses/approx_kl",
    "losses/entropy",
)
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


def seed_dir(out_dir: Path, cfg: OnlineFinetuneConfig, seed: int) -> Path:
    """Where seed ``seed``'s offline-init run goes: ``out_dir`` for ``cfg.seeds[0]``, else
    ``out_dir/seeds/<seed>``."""
    return Path(out_dir) if seed == cfg.seeds[0] else Path(out_dir) / SEEDS_DIR / str(seed)


def offline_init_dir(offline_dir: Path, seed: int) -> Path:
    """The offline run seed ``seed`` starts from: ``offline_dir/seeds/<seed>`` if it exists."""
    per_seed = Path(offline_dir) / SEEDS_DIR / str(seed)
    return per_seed if per_seed.is_dir() else Path(offline_dir)


def count_hacked(episodes: list[dict[str, float]], watched: bool) -> int | None:
    """How many episodes raised the CLIP score while lowering the verifier (None: no verifier)."""
    if not watched:
        return None
    return sum(e["clip_score_delta"] > 0 and e["verifier_delta"] < 0 for e in episodes)


def _train_run(
    live: DatasetMDP,
    nets: OfflineNetworks,
    init: Init,
    seed: int,
    cfg: OnlineFinetuneConfig,
    rewards: RewardConfig,
    out_dir: Path,
    source: dict[str, Any],
    log: Callable[[str], Any] | None,
) -> dict[str, Any]:
    """One PPO run (``init`` from the offline networks or from scratch); writes ``out_dir``'s
    four files and returns the content of its ``metrics.json``."""
    tic = time.perf_counter()
    task, sampler = live.task, live.sampler
    ablation = nets.ablation
    layout = observation_layout(sampler)
    if ablation.observation is not None and ablation.observation != layout:
        raise ValueError(
            f"the offline policy in {source['offline']} records the observation layout "
            f"{ablation.observation.to_dict()}, the dataset's sampler has {layout.to_dict()}"
        )
    # the scratch run takes the critic only for its architecture (fresh=True copies no weights)
    critic = nets.critic if cfg.init_critic else None
    env = SamplerVectorEnv(
        sampler,
        live.prompts,
        cfg.n_envs,
        rewards,
        task.component_stats,
        seed=seed,
        allowed=ablation.allowed(task.actions),
        observation_drop=ablation.observation_drop,
    )
    model = build_maskable_ppo(
        Sb3VecEnv(env),
        nets.actor,
        cfg,
        sampler.device,
        critic=critic,
        seed=seed,
        fresh=init == "scratch",
    )
    model.set_logger(Logger(folder=None, output_formats=[]))  # we write our own metrics
    watched = "verifier" in sampler.component_names
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
        hacked = count_hacked(eps, watched)
        row: dict[str, Any] = {
            "iteration": it,
            "global_step": int(model.num_timesteps),
            "charts/episodic_return": _mean([e["r"] for e in eps]),
            "charts/episodic_length": _mean([e["l"] for e in eps]),
            "charts/episodic_nfe": _mean([e["nfe"] for e in eps]),
            "charts/episodes": len(eps),
            "charts/hacked_episodes": hacked,
            "charts/hacking_share": hacked / len(eps) if hacked is not None and eps else None,
            "charts/nfe": env.total_nfe - nfe0,
            "charts/SPS": cfg.steps_per_iteration / (time.perf_counter() - it_tic),
            "losses/entropy": _finite(-float(values["train/entropy_loss"])),
        }
        row.update({new: _finite(values[old]) for old, new in SB3_TO_CLEANRL.items()})
        rows.append(row)
        if log is not None:
            log(
                f"[seed {seed}, {init} init] iteration {it}/{cfg.iterations}: "
                + ", ".join(f"{k} {_fmt(row[k])}" for k in LOGGED)
            )

    save_actor(
        actor_from_ppo(model, nets.actor.spec),
        task.actions,
        out_dir,
        extra={
            "init": init,
            "offline_algo": nets.manifest.get("algo"),
            "seed": seed,
            "source": source,
            "observer": task.observer,
            "config": cfg.to_dict(),
            "rewards": rewards.to_dict(),
            "actor_init": "offline actor" if init == "offline" else "fresh",
            "critic_init": "offline V" if init == "offline" and critic is not None else "fresh",
            # the scratch run standardises as the offline run does: only the weights differ
            "observation_standardization": "offline run's mean/std"
            if nets.actor.spec.standardize
            else "none",
        },
        ablation=dataclasses.replace(ablation, observation=layout),
    )
    with_eps = [r for r in rows if r["charts/episodes"]]
    n_eps = sum(r["charts/episodes"] for r in rows)
    n_hacked = sum(r["charts/hacked_episodes"] or 0 for r in rows)
    metrics = {
        "init": init,
        "seed": seed,
        "iterations": len(rows),
        "global_step": rows[-1]["global_step"],
        "seconds": round(time.perf_counter() - tic, 3),
        "charts/episodic_return_first": with_eps[0]["charts/episodic_return"] if with_eps else None,
        "charts/episodic_return_last": with_eps[-1]["charts/episodic_return"] if with_eps else None,
        "charts/episodic_nfe_last": with_eps[-1]["charts/episodic_nfe"] if with_eps else None,
        "charts/hacking_share_last": with_eps[-1]["charts/hacking_share"] if with_eps else None,
        "charts/hacking_share_overall": n_hacked / n_eps if watched and n_eps else None,
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


def finetune(
    dataset_dir: Path,
    offline_dir: Path,
    cfg: OnlineFinetuneConfig,
    out_dir: Path,
    *,
    rewards: RewardConfig,
    log: Callable[[str], Any] | None = None,
) -> dict[str, dict[str, Any]]:
    """Fine-tune the offline actor with MaskablePPO for ``cfg.iterations`` iterations per seed of
    ``cfg.seeds``, and (``cfg.from_scratch``) train the same PPO from scratch beside each.

    ``dataset_dir``: a built dataset (``meta/info.json`` with backbone/scheduler/scorer ids,
    sampler settings, components and their stats; an ``episodes`` table with train prompts).
    ``offline_dir``: an ``offline_rl`` run (``policy.d3`` + ``manifest.json``, algo iql or bc;
    further seeds optionally under ``seeds/<s>/``).
    ``rewards``: the reward definition (the ``rewards`` params section, as used offline).
    ``log``: optional ``print``-like callable for one line per iteration.
    Writes the layout of the module docstring (``seeds/`` and ``scratch/`` of an earlier call are
    replaced) and returns each run's ``metrics.json`` content keyed by its folder relative to
    ``out_dir`` (``"."``, ``"scratch"``, ``"seeds/<s>"``, ``"seeds/<s>/scratch"``).
    """
    out_dir = Path(out_dir)
    dataset_dir = Path(dataset_dir)
    # every offline run must fit the dataset's action table and observations: checked before the
    # models load
    task = read_task(dataset_dir)
    inits = {s: offline_init_dir(Path(offline_dir), s) for s in cfg.seeds}
    nets: dict[int, OfflineNetworks] = {}
    for s, where in inits.items():
        nets[s] = load_offline_networks(where, task.actions)
        check_observer(task, nets[s].manifest.get("observer"), f"the offline policy in {where}")
    torch.manual_seed(cfg.seeds[0])  # before the sampler loads (open_clip draws an init)
    live = load_dataset_mdp(dataset_dir, cfg.device, rewards)
    task = live.task

    for stale in (out_dir / SEEDS_DIR, out_dir / SCRATCH_DIR):
        if stale.is_dir():
            shutil.rmtree(stale)
    (out_dir / SEEDS_DIR).mkdir(parents=True)
    kinds: tuple[Init, ...] = ("offline", "scratch") if cfg.from_scratch else ("offline",)
    results: dict[str, dict[str, Any]] = {}
    for s in cfg.seeds:
        source = {
            "dataset": str(dataset_dir),
            "offline": str(inits[s]),
            "offline_seed_folder": inits[s] != Path(offline_dir),
            "backbone": task.backbone,
            "scheduler": task.scheduler,
            "scorer": task.scorer,
            "sampler": dataclasses.asdict(task.settings),
        }
        for init in kinds:
            # each run is seeded on its own (SB3 seeds torch, numpy and random as it builds the
            # model; the env draws from its own generator), so runs do not depend on each other
            run_dir = seed_dir(out_dir, cfg, s) / (SCRATCH_DIR if init == "scratch" else "")
            results[run_dir.relative_to(out_dir).as_posix()] = _train_run(
                live, nets[s], init, s, cfg, rewards, run_dir, source, log
            )
    index = {
        "seeds": list(cfg.seeds),
        "runs": {
            str(s): {
                init: (seed_dir(out_dir, cfg, s) / (SCRATCH_DIR if init == "scratch" else ""))
                .relative_to(out_dir)
                .as_posix()
                for init in kinds
            }
            for s in cfg.seeds
        },
    }
    (out_dir / SEEDS_DIR / "index.json").write_text(json.dumps(index, indent=2) + "\n")
    return results
