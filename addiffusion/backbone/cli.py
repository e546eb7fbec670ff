"""``addiffusion backbone build-tiny``: write the built-in random tiny pipeline and CLIP scorer."""

from __future__ import annotations

import argparse
from pathlib import Path

from addiffusion.config import read_params
from addiffusion.diffusion.config import BackboneConfig


def _build_tiny(args: argparse.Namespace) -> int:
    cfg = BackboneConfig.from_params(read_params(args.params))
    # Heavy imports here, not at module level: `addiffusion --help` imports every stage's CLI.
    from addiffusion.diffusion.backbone import save_tiny_pipeline
    from addiffusion.rewards.clip import save_tiny_clip

    save_tiny_pipeline(Path(args.out), cfg.tiny_seed)
    save_tiny_clip(Path(args.clip_out), cfg.tiny_seed)
    print(f"wrote {args.out} (diffusers pipeline) and {args.clip_out} (open_clip model)")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "backbone",
        help="helper, not a pipeline stage: build the random tiny models (tests, CI)",
        description="A helper, not a pipeline stage (dvc.yaml has no backbone stage): the "
        "pipeline runs on the shapes world's trained models in assets/shapes. `build-tiny` "
        "writes a randomly initialised tiny pipeline and scorer for unit tests and CI.",
    )
    bsub = parser.add_subparsers(dest="backbone_command", required=True, metavar="<command>")
    p = bsub.add_parser(
        "build-tiny",
        help="write the random tiny SD-format pipeline and tiny open_clip scorer (unit tests, CI)",
        description="Build the built-in `tiny` models from config with the seed backbone.tiny_seed "
        "and save them with save_pretrained / safetensors, loadable by from_pretrained / open_clip.",
    )
    p.add_argument("--out", default="models/tiny", help="pipeline folder (default: %(default)s)")
    p.add_argument(
        "--clip-out", default="models/tiny-clip", help="open_clip folder (default: %(default)s)"
    )
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.set_defaults(func=_build_tiny)
