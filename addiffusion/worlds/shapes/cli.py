"""``addiffusion shapes train``: train the shapes world's pipeline, CLIP and preview decoder."""

from __future__ import annotations

import argparse
from pathlib import Path

import torch

from addiffusion.config import read_params
from addiffusion.worlds.shapes.config import ShapesConfig


def _train(args: argparse.Namespace) -> None:
    from addiffusion.worlds.shapes.train import train, train_preview_only

    # One thread: the shapes world trains beside other work on small shared machines.
    torch.set_num_threads(args.threads)
    cfg = ShapesConfig.from_params(read_params(args.params))
    checkpoints = Path(args.checkpoints) if args.checkpoints else None
    if args.phase == "preview":
        pipeline = Path(args.pipeline) if args.pipeline else Path(args.out) / "pipeline"
        out = train_preview_only(cfg, pipeline, Path(args.out), checkpoints)
        print(f"preview decoder written to {out}")
        return
    train(cfg, Path(args.out), max_minutes=args.max_minutes, ckpt_dir=checkpoints)


def _ship(args: argparse.Namespace) -> None:
    from addiffusion.worlds.shapes.models import ship

    for f in ship(args.src, args.dst):
        print(f"{f} ({f.stat().st_size / 1e6:.2f} MB)")


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "shapes",
        help="the built-in shapes world: train its models, ship them to assets/shapes",
        description="The built-in world: 32x32 scenes of coloured circles, squares and triangles "
        "with counts and spatial relations, captions in three tiers and an exact verifier. Its "
        "trained SD-format pipeline and open_clip scorer ship in assets/shapes, so you only "
        "need `train` + `ship` (dvc.yaml's frozen shapes_train stage) to retrain them.",
    )
    shapes_sub = parser.add_subparsers(dest="shapes_command", required=True, metavar="<command>")
    p = shapes_sub.add_parser(
        "train",
        help="train VAE, CLIP, UNet + text encoder (resumable)",
        description="Train the shapes world's models from scratch, seeded, in resumable phases: "
        "the VAE (then its decoder alone), the open_clip scorer, the UNet with its text encoder, "
        "then the preview decoder (a TAESD-style AutoencoderTiny distilled from the VAE, for "
        "cheap per-step observations). Writes --out/pipeline (diffusers, exported at every UNet "
        "checkpoint, so the newest is always usable), --out/clip, --out/preview and the "
        "checkpoints (rerun the same command to resume). `--phase preview` runs the last phase "
        "alone on an already trained pipeline (minutes on a CPU; dvc.yaml's shapes_preview "
        "stage). Settings: the `shapes` section of --params (CUDA when present). Hours on a CPU.",
    )
    p.add_argument(
        "--out", required=True, help="output folder (pipeline/, clip/, preview/, checkpoints/)"
    )
    p.add_argument("--params", default="params.yaml", help="params file with a `shapes` section")
    p.add_argument(
        "--max-minutes",
        type=float,
        default=None,
        help="stop the UNet phase (and export) after this many minutes in all (default: no limit)",
    )
    p.add_argument(
        "--phase",
        choices=("all", "preview"),
        default="all",
        help="all phases, or only the preview decoder's (from --pipeline's VAE and UNet)",
    )
    p.add_argument(
        "--pipeline",
        default=None,
        help="--phase preview: the trained pipeline folder (default: --out/pipeline)",
    )
    p.add_argument(
        "--checkpoints",
        default=None,
        help="checkpoint folder (<phase>.pt; a rerun resumes from it) (default: --out/checkpoints)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.set_defaults(func=_train)
    p = shapes_sub.add_parser(
        "ship",
        help="copy a run's pipeline/ and clip/ with float16 weights",
        description="Copy --src/pipeline and --src/clip (a `shapes train` output) to --dst with "
        "float16 weights, half the size in git; diffusers and open_clip load them back into "
        "float32 models. Prints each weight file written.",
    )
    p.add_argument("--src", required=True, help="training output folder (`shapes train --out`)")
    p.add_argument("--dst", default="assets/shapes", help="where the shipped weights go")
    p.set_defaults(func=_ship)
