"""Store-level checks: does a store hold exactly the shards it should, each once, from one config?

Per-shard checks (checksums, tables, arrays) are :func:`addiffusion.datasets.validate.validate_shard`;
these look across shards, against what the store recorded (``collect.json``, ``shards.jsonl``, see
:mod:`addiffusion.datasets.store`). Each finding has a kind: ``datasets build`` refuses every kind,
and with ``--allow-incomplete`` builds past the :data:`INCOMPLETE` ones (the shards present).
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from addiffusion.datasets.schema import SCHEMA_VERSION
from addiffusion.datasets.store import (
    SHARD_LEDGER,
    STORE_MANIFEST,
    StoreMismatch,
    read_ledger,
    read_store_manifest,
    sha256_file,
    shard_index_of,
)
from addiffusion.datasets.validate import MAX_ROWS_REPORTED, Problem

SHARED_INFO_KEYS = (
    "components",
    "image_dim",
    "text_dim",
    "backbone",
    "scheduler",
    "scorer",
    "preview",
    "num_train_timesteps",
    "sampler",
    "actions",
    "nfe_convention",
)
"""Shard metadata that must agree across the shards of one dataset."""

GAP, NO_SHARD_JSON, MISNAMED, CHANGED, DUPLICATE, MIXED = (
    "gap",
    "missing shard.json",
    "misnamed",
    "changed",
    "duplicate episode",
    "mixed configs",
)
INCOMPLETE = frozenset({GAP, NO_SHARD_JSON})
"""Kinds that leave the shards present correct, only fewer: ``build --allow-incomplete``."""


def _shard_folders(store: Path) -> dict[int, Path]:
    return {
        k: p for p in sorted(store.iterdir()) if p.is_dir() and (k := shard_index_of(p)) is not None
    }


def store_problems(store_dir: Path) -> list[tuple[str, Problem]]:
    """(kind, problem) for gaps in the shard indices, shard folders without ``shard.json``,
    folders whose name disagrees with their ``shard.json``, shards that are not the ones the
    collector committed, episode ids in more than one shard, and shards of different configs."""
    store = Path(store_dir)
    found: list[tuple[str, Problem]] = []
    try:
        manifest = read_store_manifest(store)
    except StoreMismatch as e:
        return [(MIXED, Problem(str(store / STORE_MANIFEST), None, str(e)))]
    folders = _shard_folders(store)
    infos: dict[int, dict] = {}
    for k, p in folders.items():
        if not (p / "shard.json").is_file():
            found.append(
                (
                    NO_SHARD_JSON,
                    Problem(
                        str(p / "shard.json"),
                        None,
                        "missing: the shard folder has no manifest, so none of its files can be "
                        "trusted; remove the folder and rerun `addiffusion collect`",
                    ),
                )
            )
            continue
        try:
            info = json.loads((p / "shard.json").read_text())
        except (OSError, ValueError):
            continue  # validate_shard names it
        if isinstance(info, dict) and info.get("schema_version") == SCHEMA_VERSION:
            infos[k] = info  # others: validate_shard names them
    # every planned index present (collect.json), else every index up to the largest
    n = manifest["n_shards"] if manifest else (max(folders) + 1 if folders else 0)
    plan = f"{STORE_MANIFEST} n_shards" if manifest else "the largest shard index"
    for k in range(n):
        if k not in folders:
            found.append(
                (
                    GAP,
                    Problem(
                        str(store / f"shard-{k:05d}"),
                        None,
                        f"missing: the store should hold shards 0..{n - 1} ({plan}); rerun "
                        "`addiffusion collect` on this store to write it",
                    ),
                )
            )
    ledger = read_ledger(store)
    for k, info in infos.items():
        path = folders[k] / "shard.json"
        if info.get("shard_index") != k:
            found.append(
                (
                    MISNAMED,
                    Problem(
                        str(path),
                        None,
                        f"the folder is shard {k} but its shard.json says shard_index "
                        f"{info.get('shard_index')!r} (a shard copied or renamed); remove it",
                    ),
                )
            )
        elif manifest and k >= n:
            found.append(
                (
                    MISNAMED,
                    Problem(
                        str(path), None, f"shard {k} is beyond {STORE_MANIFEST} n_shards ({n})"
                    ),
                )
            )
        if k in ledger and ledger[k].get("sha256") != sha256_file(path):
            found.append(
                (
                    CHANGED,
                    Problem(
                        str(path),
                        None,
                        f"differs from the shard.json the collector committed ({SHARD_LEDGER}); "
                        "the shard was replaced or edited: remove it and rerun collect",
                    ),
                )
            )
    found += _mixed(infos, folders, manifest, store)
    found += _duplicates(infos, folders)
    return found


def _mixed(
    infos: dict[int, dict], folders: dict[int, Path], manifest: dict | None, store: Path
) -> list[tuple[str, Problem]]:
    out: list[tuple[str, Problem]] = []
    if not infos:
        return out
    ref_k = min(infos)
    ref_hash = manifest["config_hash"] if manifest else infos[ref_k].get("config_hash")
    ref_where = str(store / STORE_MANIFEST) if manifest else str(folders[ref_k] / "shard.json")
    for k, info in sorted(infos.items()):
        where = str(folders[k] / "shard.json")
        if info.get("config_hash") != ref_hash:
            out.append(
                (
                    MIXED,
                    Problem(
                        where,
                        None,
                        f"config_hash {info.get('config_hash')!r} differs from {ref_where} "
                        f"({ref_hash!r}): shards collected under different configs; keep one "
                        "config per store",
                    ),
                )
            )
            continue
        key = next(
            (x for x in SHARED_INFO_KEYS if info.get(x) != infos[ref_k].get(x)),
            None,
        )
        if key is not None:
            out.append(
                (
                    MIXED,
                    Problem(
                        where,
                        None,
                        f"{key} = {info.get(key)!r} differs from {folders[ref_k]}/shard.json "
                        f"({infos[ref_k].get(key)!r}): a store holds one collection setup",
                    ),
                )
            )
    return out


def _duplicates(infos: dict[int, dict], folders: dict[int, Path]) -> list[tuple[str, Problem]]:
    frames = []
    for k in sorted(infos):
        f = folders[k] / "episodes.parquet"
        try:
            ids = pl.read_parquet(f, columns=["episode_id"])
        except Exception:  # noqa: BLE001 - validate_shard names an unreadable file
            continue
        frames.append(ids.with_row_index("_row").with_columns(pl.lit(str(f)).alias("_file")))
    if not frames:
        return []
    ids = pl.concat(frames)
    dup = ids.filter(pl.col("episode_id").is_duplicated())
    out = []
    for eid, group in list(dup.group_by("episode_id", maintain_order=True))[:MAX_ROWS_REPORTED]:
        files = group["_file"].to_list()
        if len(set(files)) == 1:
            continue  # within one shard: validate_shard reports it
        for r in group.slice(1).iter_rows(named=True):
            out.append(
                (
                    DUPLICATE,
                    Problem(
                        r["_file"],
                        int(r["_row"]),
                        f"episode_id {eid[0]!r} is also in {files[0]} (a shard copied under "
                        "a second name?); remove the copy",
                    ),
                )
            )
    return out
