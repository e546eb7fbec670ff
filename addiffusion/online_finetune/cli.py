"""``addiffusion online-finetune``: short MaskablePPO fine-tuning of the offline actor."""

from __future__ import annotations

import argparse
from pathlib import Path

from addiffusion.config import read_params
from addiffusion.online_finetune.config import OnlineFinetuneConfig
from addiffusion.rewards.config import RewardConfig


def _fmt(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.4g}"


def _finetune(args: argparse.Namespace) -> int:
    params = read_params(args.params)
    cfg = OnlineFinetuneConfig.from_params(params)
    rewards = RewardConfig.from_params(params)
    import torch  # heavy imports only once params are valid

    from addiffusion.online_finetune.finetune import finetune

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    metrics = finetune(
        Path(args.dataset),
        Path(args.offline),
        cfg,
        Path(args.out),
        rewards=rewards,
        log=None if args.quiet else print,
    )
    print(
        f"online-finetune: {metrics['iterations']} iterations, {metrics['global_step']} steps in "
        f"{metrics['seconds']:.1f}s; episodic return {_fmt(metrics['charts/episodic_return_first'])}"
        f" -> {_fmt(metrics['charts/episodic_return_last'])}; actor written to {args.out}"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "online-finetune",
        help="fine-tune the offline (IQL) actor with MaskablePPO on the live sampler",
        description=(
            "Fine-tune the offline policy online with sb3-contrib MaskablePPO.\n\n"
            "The environment is "
            "the dataset's own MDP: backbone, scheduler, CLIP scorer, sampler settings and the "
            "action table (jump-s per stride, stop, refine) are read from "
            "<dataset>/meta/info.json, prompts are the dataset's train split, rewards combine "
            "the raw components with the dataset's normalisation stats and the `rewards` params "
            "section.\n\nThe PPO policy starts as the actor in <offline>/policy.d3 (loaded only if "
            "its sha256 matches <offline>/manifest.json, whose action table must be the dataset's); "
            "its value network starts as the offline "
            "run's V (init_critic: true) or fresh.\n\nHyperparameters come from the "
            "`online_finetune` params section (n_envs, n_steps, iterations, learning_rate, "
            "batch_size, n_epochs, gamma, gae_lambda, clip_range, ent_coef, init_critic, seed, "
            "device).\n\nWrites <out>/actor.safetensors + manifest.json (sha256, "
            "architecture, obs dim, action table; no pickle), <out>/metrics.json (per iteration: "
            "charts/episodic_return, charts/episodic_nfe, losses/approx_kl, losses/entropy, ...) "
            "and <out>/training.csv."
        ),
    )
    p.add_argument("--dataset", required=True, help="built dataset folder (with meta/info.json)")
    p.add_argument(
        "--offline", required=True, help="offline_rl output folder (policy.d3 + manifest.json)"
    )
    p.add_argument("--out", required=True, help="output folder (created if missing)")
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default: 0 = torch's own choice; 1 on a shared machine)",
    )
    p.add_argument("--quiet", action="store_true", help="no per-iteration lines")
    p.set_defaults(func=_finetune)
