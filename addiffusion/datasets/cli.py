"""``addiffusion datasets <command>``: build, validate, relabel, stats, push."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from addiffusion.config import read_params


def _build(args: argparse.Namespace) -> int:
    from addiffusion.datasets.build import build_dataset
    from addiffusion.datasets.config import DatasetsConfig

    cfg = DatasetsConfig.from_params(read_params(args.params))
    # A store build refuses raises BuildError, a UserError: `main` says why and exits 2.
    out = build_dataset(
        Path(args.store), Path(args.out), cfg, allow_incomplete=args.allow_incomplete
    )
    info = json.loads((out / "meta" / "info.json").read_text())
    c = info["counts"]
    print(
        f"datasets build: {c['episodes']} episodes, {c['steps']} steps from {c['shards']} "
        f"shards -> {out}"
    )
    return 0


def _validate(args: argparse.Namespace) -> int:
    from addiffusion.datasets.validate import validate

    problems = validate(Path(args.path))
    for p in problems:
        print(p)
    print(
        f"datasets validate: {len(problems)} problem(s) in {args.path}",
        file=sys.stderr if problems else sys.stdout,
    )
    return 1 if problems else 0


def _relabel(args: argparse.Namespace) -> int:
    from addiffusion.datasets.relabel import relabel
    from addiffusion.rewards.config import RewardConfig

    cfg = RewardConfig.from_params(read_params(args.params))
    summary = relabel(Path(args.dataset), cfg, Path(args.out))
    print(
        f"datasets relabel: {summary['rows']} steps -> {args.out} (summary "
        f"{Path(args.out).with_suffix('.json')})"
    )
    return 0


def _stats(args: argparse.Namespace) -> int:
    from addiffusion.datasets.stats import dataset_stats, write_stats
    from addiffusion.rewards.config import RewardConfig

    cfg = RewardConfig.from_params(read_params(args.params))
    js, png = write_stats(dataset_stats(Path(args.path), cfg), Path(args.out))
    print(f"datasets stats: wrote {js} and {png}")
    return 0


def _push(args: argparse.Namespace) -> int:
    from addiffusion.datasets.hub import push_to_hub

    url = push_to_hub(
        Path(args.dataset), args.repo_id, private=args.private, revision=args.revision
    )
    print(f"datasets push: {url}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "datasets",
        help="trajectory datasets: build from a store, validate, relabel rewards, "
        "stats, push to the Hub",
        description="Trajectory datasets. `build` merges the shards of a `collect` store into a "
        "dataset folder (meta/info.json, Parquet, Zarr features, WebDataset), `relabel` computes "
        "rewards from its raw reward components and `stats` summarises it: these three are "
        "dvc.yaml stages. `validate` and `push` are helpers.",
    )
    stage = parser.add_subparsers(dest="datasets_command", required=True, metavar="<command>")
    params_help = "params file (default: %(default)s)"

    p = stage.add_parser(
        "build",
        help="merge a store's complete shards into a dataset folder",
        description="Verify every complete shard of --store (checksums, schema, indices) and "
        "merge them into --out (meta/info.json, data/*/ Parquet, features.zarr, webdataset/, "
        "README.md). A corrupted shard, a missing, copied, renamed or changed shard, a duplicate "
        "episode id or shards of two configs abort the build. --out must be new, empty or a "
        "dataset this command built (it is then replaced atomically once the new one is "
        "complete); never the store, a folder holding other files, or a file. Layout keys: the "
        "`datasets` section of --params.",
    )
    p.add_argument("--store", required=True, help="store folder written by `addiffusion collect`")
    p.add_argument(
        "--out", required=True, help="dataset folder to create (new/empty) or replace (built here)"
    )
    p.add_argument(
        "--allow-incomplete",
        action="store_true",
        help="build the shards present although the store misses shards or a shard.json",
    )
    p.add_argument("--params", default="params.yaml", help=params_help)
    p.set_defaults(func=_build)

    v = stage.add_parser(
        "validate",
        help="check a shard, a store or a built dataset (exit 1 on problems)",
        description="Checks schema version, sha256 manifest, Parquet columns, step/episode "
        "indices, NaN/inf and feature dims; prints one line per problem naming file and row.",
    )
    v.add_argument("path", help="a shard folder, a store folder or a built dataset folder")
    v.set_defaults(func=_validate)

    r = stage.add_parser(
        "relabel",
        help="recompute rewards from raw components",
        description="Rewards of continue / stop / refine for every step, from the dataset's raw "
        "reward components and the `rewards` section of --params. Writes --out (Parquet) and "
        "a JSON summary beside it. The dataset is only read.",
    )
    r.add_argument("--dataset", required=True, help="built dataset folder")
    r.add_argument("--out", required=True, help="rewards Parquet file to write")
    r.add_argument("--params", default="params.yaml", help=params_help)
    r.set_defaults(func=_relabel)

    s = stage.add_parser(
        "stats",
        help="dataset statistics (stats.json + stats.png)",
        description="Counts, behaviour actions, per-category steps and returns (rewards from "
        "the `rewards` section of --params), reward component scales.",
    )
    s.add_argument("path", help="built dataset folder")
    s.add_argument("--out", required=True, help="folder for stats.json and stats.png")
    s.add_argument("--params", default="params.yaml", help=params_help)
    s.set_defaults(func=_stats)

    h = stage.add_parser(
        "push",
        help="upload a built dataset to the Hugging Face Hub",
        description="Validates the folder, then uploads it (data formats only) as a dataset "
        "repo; needs network and a token (HF_TOKEN or `hf auth login`).",
    )
    h.add_argument("--dataset", required=True, help="built dataset folder")
    h.add_argument(
        "--repo-id", required=True, help="Hub dataset repo, e.g. user/addiffusion-shapes"
    )
    h.add_argument("--private", action="store_true", help="create the repo as private")
    h.add_argument("--revision", default=None, help="branch to push to (default: main)")
    h.set_defaults(func=_push)
