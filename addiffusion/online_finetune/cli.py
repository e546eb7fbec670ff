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
    runs = finetune(
        Path(args.dataset),
        Path(args.offline),
        cfg,
        Path(args.out),
        rewards=rewards,
        log=None if args.quiet else print,
    )
    for where, m in runs.items():
        print(
            f"online-finetune (seed {m['seed']}, {m['init']} init): {m['iterations']} iterations, "
            f"{m['global_step']} steps in {m['seconds']:.1f}s; episodic return "
            f"{_fmt(m['charts/episodic_return_first'])} -> "
            f"{_fmt(m['charts/episodic_return_last'])}; hacking share "
            f"{_fmt(m['charts/hacking_share_overall'])}; actor written to "
            f"{Path(args.out) / where}"
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
            "run's V (init_critic: true) or fresh. With from_scratch: true (the default) the "
            "same command also trains the same PPO (architecture, hyperparameters, seed, "
            "environment steps, the offline run's observation standardisation) from a fresh "
            "random init into <out>/scratch/, the baseline that shows what the offline init adds. "
            "An offline run restricted to some actions (manifest allowed_actions) or blind to "
            "some observation parts (observation_drop) keeps those restrictions in both runs and "
            "in the saved actor.\n\nHyperparameters come from the "
            "`online_finetune` params section (n_envs, n_steps, iterations, learning_rate, "
            "batch_size, n_epochs, gamma, gae_lambda, clip_range, ent_coef, init_critic, seeds, "
            "from_scratch, device). seeds[0] writes <out>/, each further seed s writes "
            "<out>/seeds/<s>/ (and its scratch/), starting from <offline>/seeds/<s>/ when that "
            "folder exists, else from <offline>/.\n\nEach run folder holds actor.safetensors + "
            "manifest.json (sha256, architecture, obs dim, action table, init, seed, ablation; "
            "no pickle), metrics.json (per iteration: charts/episodic_return, "
            "charts/episodic_nfe, charts/hacking_share, losses/approx_kl, losses/entropy, ...) "
            "and training.csv (the same rows, for dvc plots). charts/hacking_share is the share "
            "of the iteration's finished episodes whose final CLIP score rose while the verifier "
            "fell (vs their first x0-hat); null without a verifier component (only the shapes "
            "world has one)."
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
