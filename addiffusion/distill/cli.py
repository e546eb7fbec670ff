"""``addiffusion distill``: on-policy distillation of a teacher pipeline into a student.

The student samples its own trajectories at its step count (``distill.n_steps``); the teacher
grades every state the student visits at the same timestep; the loss is the per-timestep KL
between their Gaussian transition kernels plus a prediction-MSE auxiliary. Settings: the
``distill`` section of the params file. ``distill train`` writes the student before and after
(diffusers pipeline folders), checkpoints and metrics.jsonl; ``distill eval`` compares them on
held-out prompts and exports a blinded survey.

The default is the built-in shapes world (tiny: CPU, about a minute). To distil SD3.5 Large into
SD3.5 Medium on a GPU, set in params.yaml::

    distill:
      teacher: stabilityai/stable-diffusion-3.5-large
      student: stabilityai/stable-diffusion-3.5-medium
      student_init: pretrained
      scheduler: flowmatch-euler
      drop_components: [text_encoder_3, tokenizer_3]   # optional: SD3 without T5
      height: 1024
      width: 1024
      n_steps: 8
      guidance_scale: 4.5
      prompts: prompts/parti.tsv      # any collect.prompts source
      batch_size: 1
      grad_accum_steps: 8
      train_steps: 2000
      learning_rate: 1.0e-5
      mixed_precision: auto           # bf16 on the GPU
      device: cuda
      scorer: ViT-L-14@openai
      eval_batch_size: 4

then run ``addiffusion distill train --out models/distill`` (``accelerate launch -m
addiffusion.distill train ...`` for several GPUs) and ``addiffusion distill eval``. Teacher and
student must share the scheduler and its timesteps (checked; a mismatch is an error).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from addiffusion.config import read_params
from addiffusion.distill.config import DistillConfig


def _threads(args: argparse.Namespace) -> None:
    if args.threads > 0:
        import torch

        torch.set_num_threads(args.threads)


def _train(args: argparse.Namespace) -> int:
    _threads(args)
    cfg = DistillConfig.from_params(read_params(args.params))
    from addiffusion.distill.train import train  # heavy imports only once params are valid

    s = train(cfg, Path(args.out), progress=not args.quiet)
    last = s.last
    print(
        f"distill: {s.steps} steps ({'resumed from ' + str(s.resumed_from) if s.resumed_from else 'fresh'}) "
        f"in {s.seconds:.1f}s; last total={last.get('total', float('nan')):.4f} "
        f"kl={last.get('kl', float('nan')):.4f} mse={last.get('mse', float('nan')):.4f}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    _threads(args)
    cfg = DistillConfig.from_params(read_params(args.params))
    from addiffusion.distill.evaluate import evaluate

    r = evaluate(
        cfg,
        Path(args.train),
        Path(args.out),
        Path(args.survey) if args.survey else None,
        Path(args.key) if args.key else None,
        progress=not args.quiet,
    )
    t, c = r["table"], r["post_minus_pre"]
    parts = [
        f"{k}: pre={t['pre'][k]:.4f} post={t['post'][k]:.4f} "
        f"diff={c[k]['diff']:+.4f} [{c[k]['ci_low']:+.4f}, {c[k]['ci_high']:+.4f}]"
        for k in ("image_mse", "verifier", "clip")
        if k in c
    ]
    print(f"distill eval ({r['n_items']} items, {r['seconds']:.1f}s): " + "; ".join(parts))
    return 0


def _teacher_store(args: argparse.Namespace) -> int:
    _threads(args)
    cfg = DistillConfig.from_params(read_params(args.params))
    from addiffusion.diffusion.backbone import resolve_device
    from addiffusion.distill.pair import load_pair
    from addiffusion.distill.teacher_store import write_teacher_trajectories
    from addiffusion.distill.train import train_prompts
    from addiffusion.rewards.clip import ClipScorer

    device = str(resolve_device(cfg.device))
    pair = load_pair(cfg, device)
    prompts = train_prompts(cfg)[: args.n_prompts or None]
    n = write_teacher_trajectories(
        pair,
        ClipScorer(cfg.scorer, device),
        [(p.prompt_id, p.text, p.category) for p in prompts],
        list(range(args.seeds)),
        Path(args.store),
        cfg.teacher,
        shard_size=args.shard_size,
    )
    print(f"distill record: {len(prompts) * args.seeds} episodes in {n} shards of {args.store}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "distill",
        help="on-policy distillation of a teacher pipeline into a student (train, eval)",
        description=__doc__,
    )
    group = p.add_subparsers(dest="distill_command", required=True, metavar="<command>")

    t = group.add_parser(
        "train",
        help="distil the teacher into the student on the student's own rollouts",
        description="On-policy distillation (accelerate): rollouts of the current student, "
        "teacher grading at the same timesteps, KL + MSE loss, gradient accumulation, clipping, "
        "mixed precision on GPUs. Writes <out>/student_init (before), <out>/student (after), "
        "<out>/checkpoints, metrics.jsonl, training.csv, metrics.json. Rerunning the same "
        "command after an interruption resumes from the last checkpoint with the same result.",
    )
    t.add_argument("--out", default="models/distill", help="output folder")
    t.add_argument("--params", default="params.yaml", help="params file")
    t.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default: 0 = torch's own choice; 1 on a shared machine)",
    )
    t.add_argument("--quiet", action="store_true", help="no progress bar")
    t.set_defaults(func=_train)

    e = group.add_parser(
        "eval",
        help="compare the student before and after distillation on held-out prompts",
        description="Teacher, student before and student after, sampled from the same noise on "
        "held-out prompts at the student's step count: teacher-student image MSE, CLIP "
        "similarity, shapes-verifier accuracy, diversity across seeds, with a paired bootstrap "
        "CI of post - pre. Writes <out>/metrics.json, report.md, comparison.png, items.csv; with "
        "--survey a blinded side-by-side survey (survey.csv + images) and its answer key in "
        "--key, a separate folder.",
    )
    e.add_argument("--train", default="models/distill", help="distill train's output folder")
    e.add_argument("--out", default="results/distill", help="report folder")
    e.add_argument("--survey", default=None, help="survey export folder (none: no survey)")
    e.add_argument(
        "--key",
        default=None,
        help="answer key folder, apart from the survey (default: <survey>/../survey_key)",
    )
    e.add_argument("--params", default="params.yaml", help="params file")
    e.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default: 0 = torch's own choice; 1 on a shared machine)",
    )
    e.add_argument("--quiet", action="store_true", help="no progress bar")
    e.set_defaults(func=_eval)

    s = group.add_parser(
        "record",
        help="record teacher trajectories into a trajectory store (offline warm-start)",
        description="Run the teacher on train prompts x seeds at the student's timesteps and "
        "record every step (x0 latents, CLIP features and score) into a sharded trajectory "
        "store; set distill.offline_store to it and distill.offline_steps > 0 to warm-start "
        "the student on them. Resumable: complete shards are kept.",
    )
    s.add_argument("--store", default="data/distill_teacher", help="store folder")
    s.add_argument("--n-prompts", type=int, default=64, help="train prompts (0: all)")
    s.add_argument("--seeds", type=int, default=2, help="seeds per prompt")
    s.add_argument("--shard-size", type=int, default=32, help="episodes per shard")
    s.add_argument("--params", default="params.yaml", help="params file")
    s.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default: 0 = torch's own choice; 1 on a shared machine)",
    )
    s.set_defaults(func=_teacher_store)
