"""``addiffusion collect``: record trajectories into the sharded store (resumable)."""

from __future__ import annotations

import argparse
import errno
import os
import sys
from pathlib import Path

from addiffusion.collect.config import CollectConfig
from addiffusion.config import read_params


def _collect(args: argparse.Namespace) -> int:
    cfg = CollectConfig.from_params(read_params(args.params))
    from addiffusion.collect.collector import collect  # heavy imports only once params are valid

    # torch.distributed / accelerate launchers set RANK and WORLD_SIZE.
    rank = args.rank if args.rank is not None else int(os.environ.get("RANK", 0))
    world = args.world_size if args.world_size is not None else int(os.environ.get("WORLD_SIZE", 1))
    if not 0 <= rank < world:
        raise SystemExit(f"rank must be in [0, world_size) = [0, {world}), got {rank}")
    local_rank = os.environ.get("LOCAL_RANK")
    if local_rank is not None and cfg.device != "cpu":
        import torch

        # One process per GPU: "cuda" (and "auto") then mean this process's own GPU.
        if torch.cuda.is_available():
            torch.cuda.set_device(int(local_rank) % torch.cuda.device_count())
    store = Path(args.store)
    try:
        s = collect(
            cfg,
            store,
            rank=rank,
            world_size=world,
            progress=not args.quiet,
            record_timings=not args.no_timings,
        )
    except OSError as e:
        if e.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        from addiffusion.datasets.store import completed_shards

        # The shard being written is removed by its writer; complete shards stay valid.
        print(
            f"addiffusion collect: no space left on device writing {store} ({e}); "
            f"{len(completed_shards(store))} complete shard(s) are kept and the incomplete one "
            "was removed. Free space and rerun the same command to resume",
            file=sys.stderr,
        )
        return 1
    print(
        f"collect: {s.shards_written} shards written, {s.shards_skipped} already complete, "
        f"{s.episodes} episodes, {s.steps} steps in {s.seconds:.1f}s"
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "collect",
        help="run prompts x seeds to n_max and record every step into the trajectory store",
        description="Record full denoising trajectories (features, raw reward components, NFE per "
        "step) into <store>/shard-NNNNN folders. Settings come from the `collect` section of the "
        "params file. Resumable: complete shards are skipped, incomplete ones redone; a store "
        "collected with other settings is refused (only device and batch_size may change). "
        "Several processes (accelerate launch / torchrun set RANK and WORLD_SIZE) write disjoint "
        "shards, each holding a lock of its rank in <store>/.locks.",
    )
    p.add_argument("--store", default="data/store", help="store folder (default: %(default)s)")
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument(
        "--rank", type=int, default=None, help="this process's rank (default: $RANK or 0)"
    )
    p.add_argument(
        "--world-size",
        type=int,
        default=None,
        help="number of processes (default: $WORLD_SIZE or 1)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.add_argument(
        "--no-timings",
        action="store_true",
        help="write 0 for wall_time_s and peak_mem_bytes (the only columns that differ between "
        "two runs of one seed on one machine), so that the shards are byte-identical",
    )
    p.set_defaults(func=_collect)
