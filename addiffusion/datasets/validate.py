"""Validate a store shard, a whole store or a built dataset; every problem names file and row.

Checks: schema version, sha256 of every file against the manifest (``shard.json`` / ``meta/
info.json``), Parquet readability and column types, episode/step integrity (steps contiguous from
the episode's first step, every step's episode exists, branch parents exist, feature/text rows in
range), actions in range, NaN/inf in scalars and in the feature arrays, feature dims vs metadata.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from addiffusion.datasets.schema import EPISODES_SCHEMA, SCHEMA_VERSION
from addiffusion.datasets.store import sha256_file, shard_paths, steps_schema

MAX_ROWS_REPORTED = 5
SPLITS = ("train", "heldout")


@dataclass(frozen=True)
class Problem:
    """One finding: ``file`` (path as given), ``row`` (0-based row in that file, if any)."""

    file: str
    row: int | None
    message: str

    def __str__(self) -> str:
        where = self.file if self.row is None else f"{self.file} row {self.row}"
        return f"{where}: {self.message}"


def check_files(root: Path, listed: dict[str, str], exclude: set[str]) -> list[Problem]:
    """Every listed file present with its sha256, no unlisted file."""
    problems = []
    for rel, digest in sorted(listed.items()):
        p = root / rel
        if not p.is_file():
            problems.append(Problem(str(p), None, "listed in the manifest but missing"))
        elif sha256_file(p) != digest:
            problems.append(
                Problem(
                    str(p),
                    None,
                    "sha256 differs from the manifest (file corrupted or changed after writing)",
                )
            )
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in listed and rel not in exclude:
            problems.append(Problem(str(p), None, "file not listed in the manifest"))
    return problems


def _loose(t: pa.DataType) -> pa.DataType:
    """Arrow types up to string/large_string (polars writes the latter): same data."""
    return {
        pa.large_string(): pa.string(),
        pa.string_view(): pa.string(),
        pa.large_binary(): pa.binary(),
    }.get(t, t)


def read_checked(
    files: list[Path], expected: pa.Schema, problems: list[Problem]
) -> pl.DataFrame | None:
    """Read Parquet files into one frame with ``_file`` and ``_row`` (row within its file);
    None (with problems recorded) when a file is unreadable or lacks a column."""
    frames = []
    for f in files:
        try:
            schema = pq.read_schema(f)
            df = pl.read_parquet(f)
        except Exception as e:  # noqa: BLE001 - any decode failure is a finding, not a crash
            problems.append(Problem(str(f), None, f"cannot read Parquet ({type(e).__name__}: {e})"))
            return None
        bad = False
        for field in expected:
            if field.name not in schema.names:
                problems.append(
                    Problem(str(f), None, f"missing column {field.name!r} (expected {field.type})")
                )
                bad = True
            elif _loose(schema.field(field.name).type) != _loose(field.type):
                problems.append(
                    Problem(
                        str(f),
                        None,
                        f"column {field.name!r} has type "
                        f"{schema.field(field.name).type}, expected {field.type}",
                    )
                )
                bad = True
        if bad:
            return None
        frames.append(df.with_row_index("_row").with_columns(pl.lit(str(f)).alias("_file")))
    if not frames:
        return None
    return pl.concat(frames, how="vertical_relaxed")


def _report(problems: list[Problem], rows: pl.DataFrame, message: str) -> None:
    for r in rows.head(MAX_ROWS_REPORTED).iter_rows(named=True):
        problems.append(Problem(r["_file"], int(r["_row"]), message.format(**r)))
    if rows.height > MAX_ROWS_REPORTED:
        first = rows.row(0, named=True)
        problems.append(
            Problem(
                first["_file"],
                None,
                f"... and {rows.height - MAX_ROWS_REPORTED} more rows with the same problem",
            )
        )


def check_tables(
    episodes: pl.DataFrame, steps: pl.DataFrame, components: list[str], n_image: int, n_text: int
) -> list[Problem]:
    """Index integrity between the episodes and steps tables (frames from :func:`read_checked`)."""
    p: list[Problem] = []
    _report(
        p,
        episodes.filter(pl.col("episode_id").is_duplicated()),
        "episode_id {episode_id!r} appears more than once",
    )
    _report(
        p,
        episodes.filter(~pl.col("split").is_in(SPLITS)),
        "split {split!r} is not one of " + "/".join(SPLITS),
    )
    _report(
        p,
        steps.join(episodes.select("episode_id"), on="episode_id", how="anti"),
        "step of episode {episode_id!r}, which is not in the episodes table",
    )
    parents = episodes.filter(pl.col("parent_episode_id").is_not_null())
    _report(
        p,
        parents.join(
            episodes.select(pl.col("episode_id").alias("parent_episode_id")),
            on="parent_episode_id",
            how="anti",
        ),
        "branch {episode_id!r} names parent {parent_episode_id!r}, which does not exist",
    )
    per_ep = steps.group_by("episode_id").agg(
        pl.len().alias("n"),
        pl.col("step").min().alias("lo"),
        pl.col("step").max().alias("hi"),
        pl.col("step").n_unique().alias("uniq"),
    )
    first = (
        pl.when(pl.col("parent_episode_id").is_null()).then(0).otherwise(pl.col("branch_step") + 1)
    )
    joined = episodes.join(per_ep, on="episode_id", how="left").with_columns(first.alias("first"))
    bad = joined.filter(
        pl.col("n").is_null()
        | (pl.col("n") != pl.col("num_steps"))
        | (pl.col("lo") != pl.col("first"))
        | (pl.col("hi") != pl.col("first") + pl.col("num_steps") - 1)
        | (pl.col("uniq") != pl.col("n"))
    )
    _report(
        p,
        bad,
        "episode {episode_id!r}: num_steps={num_steps} but its steps are {n} rows "
        "numbered {lo}..{hi} ({uniq} distinct); expected contiguous {first}.."
        "{first}+num_steps-1",
    )
    _report(
        p,
        steps.filter((pl.col("feature_row") < 0) | (pl.col("feature_row") >= n_image)),
        f"feature_row {{feature_row}} out of range [0, {n_image})",
    )
    _report(
        p,
        steps.filter(pl.col("feature_row").is_duplicated()),
        "feature_row {feature_row} used by more than one step",
    )
    _report(
        p,
        episodes.filter((pl.col("text_row") < 0) | (pl.col("text_row") >= n_text)),
        f"text_row {{text_row}} out of range [0, {n_text})",
    )
    _report(p, steps.filter(~pl.col("action").is_between(0, 2)), "action {action} not in 0..2")
    for c in ["timestep", "t_frac", "sigma", "behavior_prob", *components]:
        _report(
            p,
            steps.filter(pl.col(c).is_null() | ~pl.col(c).is_finite()),
            f"{c} is {{{c}}} (must be finite)",
        )
    return p


def check_array(
    group: zarr.Group | None,
    root: Path,
    name: str,
    rows: int | None,
    tail: tuple[int, ...],
    problems: list[Problem],
    block: int = 65536,
) -> int:
    """Shape/dtype/finite checks of one Zarr array; returns its row count (0 if unusable)."""
    where = str(root / name)
    if group is None or name not in group:
        problems.append(Problem(where, None, "array missing"))
        return 0
    arr = group[name]
    if tuple(arr.shape[1:]) != tail or (rows is not None and arr.shape[0] != rows):
        want = (rows if rows is not None else "n", *tail)
        problems.append(Problem(where, None, f"shape {tuple(arr.shape)}, expected {want}"))
        return 0
    for start in range(0, arr.shape[0], block):
        try:
            data = np.asarray(arr[start : start + block])
        except Exception as e:  # noqa: BLE001 - a corrupted chunk is a finding
            problems.append(
                Problem(
                    where,
                    start,
                    f"cannot decode rows {start}..{start + block - 1} ({type(e).__name__}: {e})",
                )
            )
            return 0
        if np.issubdtype(data.dtype, np.floating):
            bad = np.flatnonzero(~np.isfinite(data.reshape(len(data), -1)).all(axis=1))
            for r in bad[:MAX_ROWS_REPORTED]:
                problems.append(Problem(where, start + int(r), "row has NaN/inf"))
    return int(arr.shape[0])


def _open_group(path: Path, problems: list[Problem]) -> zarr.Group | None:
    try:
        return zarr.open_group(path, mode="r", zarr_format=3)
    except Exception as e:  # noqa: BLE001
        problems.append(Problem(str(path), None, f"cannot open Zarr v3 group ({e})"))
        return None


def _read_json(path: Path, problems: list[Problem]) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError) as e:
        problems.append(Problem(str(path), None, f"cannot read JSON ({e})"))
        return None
    if data.get("schema_version") != SCHEMA_VERSION:
        problems.append(
            Problem(
                str(path),
                None,
                f"schema_version {data.get('schema_version')!r}, this code reads {SCHEMA_VERSION}",
            )
        )
        return None
    return data


def _check_contents(
    root: Path,
    info: dict[str, Any],
    episode_files: list[Path],
    step_files: list[Path],
    episodes_schema: pa.Schema,
    image_dim: int,
    text_dim: int,
) -> list[Problem]:
    problems: list[Problem] = []
    components = list(info.get("components", []))
    episodes = read_checked(episode_files, episodes_schema, problems)
    steps = read_checked(step_files, steps_schema(components), problems)
    group = _open_group(root / "features.zarr", problems)
    n_img = check_array(
        group,
        root / "features.zarr",
        "image_features",
        steps.height if steps is not None else None,
        (image_dim,),
        problems,
    )
    n_txt = check_array(
        group,
        root / "features.zarr",
        "text_features",
        episodes.height if episodes is not None else None,
        (text_dim,),
        problems,
    )
    if episodes is not None and steps is not None:
        problems += check_tables(episodes, steps, components, n_img, n_txt)
    return problems


def validate_shard(path: Path) -> list[Problem]:
    path = Path(path)
    problems: list[Problem] = []
    info = _read_json(path / "shard.json", problems)
    if info is None:
        return problems
    problems += check_files(path, info.get("files", {}), {"shard.json"})
    problems += _check_contents(
        path,
        info,
        [path / "episodes.parquet"],
        [path / "steps.parquet"],
        EPISODES_SCHEMA,
        int(info["image_dim"]),
        int(info["text_dim"]),
    )
    return problems


def validate_dataset(path: Path) -> list[Problem]:
    path = Path(path)
    problems: list[Problem] = []
    info = _read_json(path / "meta" / "info.json", problems)
    if info is None:
        return problems
    problems += check_files(path, info.get("files", {}), {"meta/info.json"})
    schema = pa.schema(
        list(EPISODES_SCHEMA) + [pa.field("shard", pa.int64()), pa.field("rl_split", pa.string())]
    )
    obs = info.get("observation", {})
    problems += _check_contents(
        path,
        info,
        sorted((path / "data" / "episodes").glob("*.parquet")),
        sorted((path / "data" / "steps").glob("*.parquet")),
        schema,
        int(obs.get("image_dim", -1)),
        int(obs.get("text_dim", -1)),
    )
    return problems


def validate(path: Path) -> list[Problem]:
    """Validate a shard folder, a store (all complete shards) or a built dataset."""
    path = Path(path)
    if (path / "shard.json").exists():
        return validate_shard(path)
    if (path / "meta" / "info.json").exists():
        return validate_dataset(path)
    shards = shard_paths(path) if path.is_dir() else []
    if not shards:
        return [
            Problem(
                str(path),
                None,
                "not a shard (shard.json), a store (shard-NNNNN/ "
                "folders) or a built dataset (meta/info.json)",
            )
        ]
    return [p for s in shards for p in validate_shard(s)]
