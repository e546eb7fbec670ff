"""``addiffusion <stage> ...``: one console script, one subcommand per stage.

Each stage module ``addiffusion.<stage>.cli`` exposes ``register(subparsers)``, which adds its
subcommand(s) and sets ``func`` on the parsed namespace.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from addiffusion.config import ConfigError

STAGES = (
    "backbone",
    "worlds.shapes",
    "collect",
    "datasets",
    "offline_rl",
    "online_finetune",
    "eval",
    "policy",
    "bench",
)
"""Modules under ``addiffusion`` whose ``cli.register`` adds subcommands (``offline_rl`` is spelt
``offline-rl`` on the command line, ``online_finetune`` ``online-finetune``)."""


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="addiffusion",
        description=(
            "Adaptive diffusion inference learned offline-first. Stages: backbone -> collect -> "
            "datasets -> offline-rl -> online-finetune -> eval -> policy export; `dvc repro` runs "
            "them in order. `addiffusion generate` uses a trained policy."
        ),
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="<stage>")
    for stage in STAGES:
        try:
            module = importlib.import_module(f"addiffusion.{stage}.cli")
        except ModuleNotFoundError as e:
            if e.name != f"addiffusion.{stage}.cli" and e.name != f"addiffusion.{stage}":
                raise
            continue
        module.register(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        result = args.func(args)
    except ConfigError as e:
        # Bad params are the user's to fix: say what is wrong, no traceback.
        print(f"addiffusion: error: {e}", file=sys.stderr)
        return 2
    return int(result or 0)


if __name__ == "__main__":
    sys.exit(main())
