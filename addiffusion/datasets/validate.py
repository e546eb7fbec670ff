"""Validate a store shard, a whole store or a built dataset; every problem names file and row.

Checks: schema version, sha256 of every file against the manifest (``shard.json`` / ``meta/
info.json``), Parquet readability and column types, episode/step integrity (every step's episode
exists, feature/text rows in range), the paths against the recorded action table
(``info["actions"]``): action ids valid and legal, steps strictly increasing on the grid, each
non-last row's next step where its action leads (``table.target``), roots from step 0, branches
leaving an existing parent row at ``branch_step`` by a legal non-stop ``branch_action`` and
starting where it leads; NaN/inf in scalars and in the feature arrays, feature dims vs metadata.
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
from addiffusion.diffusion.actions import ActionTable

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
    episodes: pl.DataFrame,
    steps: pl.DataFrame,
    components: list[str],
    n_image: int,
    n_text: int,
    table: ActionTable,
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
    p += _check_paths(episodes, steps, table)
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
    for c in ["timestep", "t_frac", "sigma", "behavior_prob", *components]:
        _report(
            p,
            steps.filter(pl.col(c).is_null() | ~pl.col(c).is_finite()),
            f"{c} is {{{c}}} (must be finite)",
        )
    return p


def _check_paths(episodes: pl.DataFrame, steps: pl.DataFrame, table: ActionTable) -> list[Problem]:
    """Steps strictly increasing and on the grid, actions valid and legal, every next row where
    the row's action leads, roots from 0, branches from a legal non-stop action at a parent row."""
    p: list[Problem] = []
    n, n_max = table.n, table.n_max
    names = {i: name for i, name in enumerate(table.names)}
    _report(
        p,
        steps.filter(~pl.col("action").is_between(0, n - 1)),
        f"action {{action}} is not an id of the recorded action table (0..{n - 1}: "
        + ", ".join(table.names)
        + ")",
    )
    _report(
        p,
        steps.filter(~pl.col("step").is_between(0, n_max - 1)),
        f"step {{step}} is off the grid [0, {n_max})",
    )
    st = steps.with_row_index("_i").sort("episode_id", "_i", maintain_order=True)
    step = np.clip(st["step"].to_numpy().astype(np.int64), 0, n_max - 1)
    action = np.clip(st["action"].to_numpy().astype(np.int64), 0, n - 1)
    used = st["refines_used"].to_numpy().astype(np.int64)
    ok_action = st["action"].is_between(0, n - 1).to_numpy()
    legal = table.mask(step, used)[np.arange(len(st)), action] | ~ok_action
    st = st.with_columns(
        pl.Series("_target", table.target(step, action)),
        pl.Series("_legal", legal),
        pl.col("action").cast(pl.Int64).replace_strict(names, default="?").alias("_name"),
        pl.col("step").shift(-1).over("episode_id").alias("_next"),
        pl.col("step").shift(1).over("episode_id").alias("_prev"),
    )
    _report(
        p,
        st.filter(pl.col("_prev").is_not_null() & (pl.col("step") <= pl.col("_prev"))),
        "episode {episode_id!r}: step {step} follows step {_prev}; steps must strictly increase",
    )
    _report(
        p,
        st.filter(~pl.col("_legal")),
        "episode {episode_id!r}: action {_name} ({action}) is illegal at step {step} "
        "(refines_used {refines_used})",
    )
    _report(
        p,
        st.filter(
            pl.col("_next").is_not_null()
            & pl.col("action").is_between(0, n - 1)
            & (pl.col("_next") > pl.col("step"))
            & (pl.col("_next") != pl.col("_target"))
        ),
        "episode {episode_id!r}: action {_name} at step {step} leads to step {_target}, but the "
        "episode's next row is step {_next}",
    )
    per_ep = st.group_by("episode_id").agg(pl.len().alias("n"), pl.col("step").first().alias("lo"))
    joined = episodes.join(per_ep, on="episode_id", how="left", maintain_order="left")
    _report(
        p,
        joined.filter(pl.col("n").is_null() | (pl.col("n") != pl.col("num_steps"))),
        "episode {episode_id!r}: num_steps={num_steps} but it has {n} step rows",
    )
    roots = joined.filter(pl.col("parent_episode_id").is_null())
    _report(
        p,
        roots.filter((pl.col("branch_step") != -1) | (pl.col("branch_action") != -1)),
        "root {episode_id!r} has branch_step {branch_step} / branch_action {branch_action} "
        "(roots have -1, -1)",
    )
    _report(
        p,
        roots.filter(pl.col("lo").is_not_null() & (pl.col("lo") != 0)),
        "root {episode_id!r} starts at step {lo}, expected 0",
    )
    parent_rows = st.select(
        pl.col("episode_id").alias("parent_episode_id"),
        pl.col("step").alias("branch_step"),
        pl.col("refines_used").alias("_parent_refines"),
    )
    br = joined.filter(pl.col("parent_episode_id").is_not_null()).join(
        parent_rows, on=["parent_episode_id", "branch_step"], how="left", maintain_order="left"
    )
    _report(
        p,
        br.filter(pl.col("_parent_refines").is_null()),
        "branch {episode_id!r}: parent {parent_episode_id!r} has no row at branch_step "
        "{branch_step}",
    )
    br = br.filter(pl.col("_parent_refines").is_not_null())
    ba = br["branch_action"].to_numpy().astype(np.int64)
    bstep = np.clip(br["branch_step"].to_numpy().astype(np.int64), 0, n_max - 1)
    ba_c = np.clip(ba, 0, n - 1)
    legal_b = table.mask(bstep, br["_parent_refines"].to_numpy())[np.arange(len(br)), ba_c]
    ok = (ba >= 0) & (ba < n) & (ba != table.stop) & legal_b
    br = br.with_columns(pl.Series("_ok", ok), pl.Series("_first", table.target(bstep, ba_c)))
    _report(
        p,
        br.filter(~pl.col("_ok")),
        "branch {episode_id!r}: branch_action {branch_action} is not a legal non-stop action "
        "at step {branch_step} of {parent_episode_id!r} (actions: "
        + ", ".join(f"{i}={name}" for i, name in enumerate(table.names))
        + ")",
    )
    _report(
        p,
        br.filter(pl.col("_ok") & pl.col("lo").is_not_null() & (pl.col("lo") != pl.col("_first"))),
        "branch {episode_id!r} starts at step {lo}, but branch_action {branch_action} from "
        "step {branch_step} leads to step {_first}",
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
    info_path: Path,
) -> list[Problem]:
    problems: list[Problem] = []
    components = list(info.get("components", []))
    table = None
    try:
        table = ActionTable.from_dict(info.get("actions"), "actions")
    except ValueError as e:
        problems.append(Problem(str(info_path), None, f"no valid action table: {e}"))
    episodes = read_checked(episode_files, episodes_schema, problems)
    steps = read_checked(step_files, steps_schema(components, "block_profile" in info), problems)
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
    if episodes is not None and steps is not None and table is not None:
        problems += check_tables(episodes, steps, components, n_img, n_txt, table)
    return problems


def validate_shard(path: Path) -> list[Problem]:
    path = Path(path)
    problems: list[Problem] = []
    info = _read_json(path / "shard.json", problems)
    if info is None:
        return problems
    bad = [k for k in ("image_dim", "text_dim") if not isinstance(info.get(k), int)]
    if bad:  # the feature arrays cannot be checked without them
        return [
            Problem(
                str(path / "shard.json"),
                None,
                f"has no {k} entry"
                if k not in info
                else f"{k} must be an integer, got {info[k]!r}",
            )
            for k in bad
        ]
    problems += check_files(path, info.get("files", {}), {"shard.json"})
    problems += _check_contents(
        path,
        info,
        [path / "episodes.parquet"],
        [path / "steps.parquet"],
        EPISODES_SCHEMA,
        int(info["image_dim"]),
        int(info["text_dim"]),
        path / "shard.json",
    )
    return problems


def validate_dataset(path: Path, ignore: set[str] | frozenset[str] = frozenset()) -> list[Problem]:
    """Problems of a built dataset; ``ignore``: relative paths of unlisted files not to report
    (files :mod:`.hub` skipped with a warning)."""
    path = Path(path)
    problems: list[Problem] = []
    info = _read_json(path / "meta" / "info.json", problems)
    if info is None:
        return problems
    problems += check_files(path, info.get("files", {}), {"meta/info.json", *ignore})
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
        path / "meta" / "info.json",
    )
    return problems


def validate(path: Path) -> list[Problem]:
    """Validate a shard folder, a store (all complete shards, and the store as a whole: see
    :mod:`addiffusion.datasets.completeness`) or a built dataset."""
    from addiffusion.datasets.completeness import store_problems

    path = Path(path)
    if (path / "shard.json").exists():
        return validate_shard(path)
    if (path / "meta" / "info.json").exists():
        return validate_dataset(path)
    across = [p for _, p in store_problems(path)] if path.is_dir() else []
    shards = shard_paths(path) if path.is_dir() else []
    if not shards and not across:
        return [
            Problem(
                str(path),
                None,
                "not a shard (shard.json), a store (shard-NNNNN/ "
                "folders) or a built dataset (meta/info.json)",
            )
        ]
    return [p for s in shards for p in validate_shard(s)] + across
