"""``datasets build``: merge the complete shards of a store into one versioned dataset folder.

Layout (``LAYOUT_VERSION`` 1)::

    <dataset>/
        README.md                       dataset card; Hub YAML ``configs``: episodes, steps,
                                        webdataset (``datasets.load_dataset(path, "steps")``)
        meta/info.json                  schema/layout version, observation layout, action table
                                        (``actions``, ActionTable.to_dict()),
                                        model ids, sampler settings, components and their
                                        normalisation stats (train split), counts, sha256 of
                                        every other file
        data/episodes/<split>-NNNNN.parquet   EPISODES_SCHEMA + shard (int64) + rl_split
        data/steps/<split>-NNNNN.parquet      STEPS_SCHEMA + one float32 column per component
        features.zarr/                  Zarr v3, sharding codec: image_features (n_steps, D_img)
                                        float32, text_features (n_episodes, D_txt) float32,
                                        optional thumbnails / latents (rows = steps)
        webdataset/episodes-NNNNN.tar   optional; one sample per episode (json + png filmstrip)

``feature_row`` / ``text_row`` index the merged arrays. ``rl_split`` is ``train`` / ``val`` for
the train split (validation chosen *by prompt text*, normalised: a repeated prompt is on one side) and ``heldout`` for the heldout split.
Shards are verified first; a corrupted shard aborts the build and no output is written. The new
dataset is assembled under a temporary name and swapped in only when complete.
"""

from __future__ import annotations

import errno
import json
import os
import shutil
import tarfile
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import zarr

from addiffusion.config import UserError
from addiffusion.datasets.card import dataset_card
from addiffusion.datasets.completeness import INCOMPLETE, SHARED_INFO_KEYS, store_problems
from addiffusion.datasets.config import DatasetsConfig
from addiffusion.datasets.out_path import BUILT_BY, check_out, swap_in
from addiffusion.datasets.schema import EPISODES_SCHEMA, SCHEMA_VERSION, normalize_prompt
from addiffusion.datasets.store import (
    Shard,
    file_checksums,
    read_shard,
    shard_paths,
    steps_schema,
    write_episode_samples,
)
from addiffusion.datasets.validate import validate_shard
from addiffusion.diffusion.mdp import ObservationLayout
from addiffusion.rewards.reward import component_stats

LAYOUT_VERSION = 1


class BuildError(UserError, RuntimeError):
    """The store cannot be built into a dataset (corrupted or inconsistent shards)."""


def prompt_val_split(
    prompt_ids: np.ndarray, val_fraction: float, seed: int, texts: list[str] | None = None
) -> set[int]:
    """Prompt ids of the offline-RL validation split (train split only). Prompts are grouped by
    :func:`normalize_prompt` of ``texts`` (one per id; without texts every id is its own group),
    so a prompt given twice lands on one side. A seeded permutation of the groups (each named by
    its smallest id) picks the first ``round(val_fraction * n)`` (>= 1 when ``val_fraction > 0``
    and n >= 2). The one definition used by build and the d3rlpy converter."""
    ids = np.asarray(prompt_ids, dtype=np.int64).tolist()
    keys = [normalize_prompt(t) for t in texts] if texts is not None else [str(i) for i in ids]
    group: dict[str, int] = {}
    for i, k in zip(ids, keys, strict=True):
        group[k] = min(group.get(k, i), i)
    reps = np.unique(np.fromiter(group.values(), dtype=np.int64, count=len(group)))
    if val_fraction <= 0 or reps.size < 2:
        return set()
    n_val = min(max(int(round(val_fraction * reps.size)), 1), reps.size - 1)
    val = {int(i) for i in np.random.default_rng(seed).permutation(reps)[:n_val]}
    return {i for i, k in zip(ids, keys, strict=True) if group[k] in val}


def warn_duplicate_prompts(episodes: pl.DataFrame) -> None:
    """Warn, counting them, about prompt ids whose text repeats another's (after
    :func:`normalize_prompt`), and about texts that are in both the train and heldout splits."""
    prompts = (
        episodes.select("prompt_id", "prompt", "split")
        .unique()
        .with_columns(
            pl.col("prompt").map_elements(normalize_prompt, return_dtype=pl.String).alias("_key")
        )
    )
    n_dup = prompts["prompt_id"].n_unique() - prompts["_key"].n_unique()
    both = (
        prompts.group_by("_key").agg(pl.col("split").n_unique().alias("n")).filter(pl.col("n") > 1)
    )
    if n_dup:
        warnings.warn(
            f"{n_dup} prompt(s) repeat another prompt's text (after stripping, collapsing "
            "whitespace and casefolding); the validation split keeps each text on one side"
            + (
                f", but {both.height} text(s) are in both the train and heldout splits: "
                "deduplicate the prompt file and recollect"
                if both.height
                else ""
            ),
            stacklevel=2,
        )


def _check_consistent(shards: list[Shard]) -> None:
    ref = shards[0]
    for s in shards[1:]:
        for key in SHARED_INFO_KEYS:
            if s.info.get(key) != ref.info.get(key):
                raise BuildError(
                    f"{s.path}/shard.json: {key} = {s.info.get(key)!r} differs from "
                    f"{ref.path}/shard.json ({ref.info.get(key)!r}); a dataset holds one "
                    "collection setup, build the stores separately"
                )


def _merged_tables(shards: list[Shard], cfg: DatasetsConfig) -> tuple[pl.DataFrame, pl.DataFrame]:
    """Concatenated episodes / steps with rows re-indexed into the merged feature arrays."""
    eps, steps = [], []
    text_off = feat_off = 0
    for s in shards:
        k = int(s.info["shard_index"])
        eps.append(
            s.episodes.with_columns(
                pl.col("text_row") + text_off, pl.lit(k, dtype=pl.Int64).alias("shard")
            )
        )
        steps.append(s.steps.with_columns(pl.col("feature_row") + feat_off))
        text_off += s.episodes.height
        feat_off += s.steps.height
    episodes = pl.concat(eps, how="vertical")
    dup = episodes.filter(pl.col("episode_id").is_duplicated())
    if dup.height:
        first = dup.row(0, named=True)
        raise BuildError(
            f"episode_id {first['episode_id']!r} appears in more than one shard "
            f"(e.g. shard {first['shard']}); collect wrote overlapping shards"
        )
    warn_duplicate_prompts(episodes)
    train = episodes.filter(pl.col("split") == "train").select("prompt_id", "prompt").unique()
    val = prompt_val_split(
        train["prompt_id"].to_numpy(), cfg.val_fraction, cfg.split_seed, train["prompt"].to_list()
    )
    episodes = episodes.with_columns(
        pl.when(pl.col("split") != "train")
        .then(pl.col("split"))
        .when(pl.col("prompt_id").is_in(sorted(val)))
        .then(pl.lit("val"))
        .otherwise(pl.lit("train"))
        .alias("rl_split")
    )
    return episodes, pl.concat(steps, how="vertical")


def _write_tables(
    out: Path,
    name: str,
    table: pl.DataFrame,
    split_of: pl.DataFrame,
    schema: pa.Schema,
    chunk_rows: int,
) -> dict[str, int]:
    folder = out / "data" / name
    folder.mkdir(parents=True)
    table = table.join(split_of, on="episode_id", how="left", maintain_order="left")
    counts = {}
    for split in ("train", "heldout"):
        part = table.filter(pl.col("_split") == split).drop("_split")
        counts[split] = part.height
        for j, start in enumerate(range(0, part.height, chunk_rows)):
            arrow = part.slice(start, chunk_rows).to_arrow().select(schema.names).cast(schema)
            pq.write_table(arrow, folder / f"{split}-{j:05d}.parquet")
    return counts


class _BlockWriter:
    """Append rows to a sharded Zarr array, writing whole Zarr shards at once (a partial-shard
    write would be a read-modify-write of the shard file)."""

    def __init__(self, arr: zarr.Array, block: int) -> None:
        self.arr, self.block, self.pos, self.buf = arr, block, 0, []  # type: ignore[var-annotated]

    def add(self, rows: np.ndarray) -> None:
        self.buf.append(rows)
        if sum(len(b) for b in self.buf) >= self.block:
            self.flush(final=False)

    def flush(self, final: bool = True) -> None:
        if not self.buf:
            return
        data = np.concatenate(self.buf)
        n = len(data) if final else (len(data) // self.block) * self.block
        self.arr[self.pos : self.pos + n] = data[:n]
        self.pos += n
        self.buf = [data[n:]] if n < len(data) else []


def _write_arrays(out: Path, shards: list[Shard], cfg: DatasetsConfig) -> dict[str, list[int]]:
    group = zarr.open_group(out / "features.zarr", mode="w", zarr_format=3)
    names = ["image_features", "text_features"]
    for name, flag in (("thumbnails", cfg.include_thumbnails), ("latents", cfg.include_latents)):
        if flag and all(s.info.get(f"has_{name}") for s in shards):
            names.append(name)
    shapes = {}
    for name in names:
        first = shards[0].features[name]
        rows = sum(s.features[name].shape[0] for s in shards)
        tail = tuple(first.shape[1:])
        # Images are large per row: keep their chunks a few MiB like the feature chunks.
        scale = max(1, int(np.prod(tail)) // 256)
        chunk = max(1, cfg.zarr_chunk_rows // scale)
        shard_rows = chunk * max(1, cfg.zarr_shard_rows // cfg.zarr_chunk_rows)
        arr = group.create_array(
            name,
            shape=(rows, *tail),
            dtype=first.dtype,
            chunks=(chunk, *tail),
            shards=(shard_rows, *tail),
        )
        writer = _BlockWriter(arr, shard_rows)
        for s in shards:
            writer.add(np.asarray(s.features[name][...]))
        writer.flush()
        shapes[name] = [rows, *tail]
    return shapes


def _write_webdataset(
    out: Path, shards: list[Shard], episodes: pl.DataFrame, steps: pl.DataFrame, schema: pa.Schema
) -> None:
    folder = out / "webdataset"
    folder.mkdir()
    for s in shards:
        k = int(s.info["shard_index"])
        ep = episodes.filter(pl.col("shard") == k)
        st = steps.join(ep.select("episode_id"), on="episode_id", how="semi", maintain_order="left")
        thumbs: list[np.ndarray] = []
        if s.info.get("has_thumbnails"):
            all_thumbs = np.asarray(s.features["thumbnails"][...])
            for eid in ep["episode_id"]:
                rows = s.steps.filter(pl.col("episode_id") == eid)["feature_row"].to_numpy()
                thumbs.append(all_thumbs[rows])
        with tarfile.open(folder / f"episodes-{k:05d}.tar", "w") as tar:
            write_episode_samples(tar, ep.to_arrow(), st.select(schema.names).to_arrow(), thumbs)


def _info(
    shards: list[Shard],
    episodes: pl.DataFrame,
    steps: pl.DataFrame,
    shapes: dict[str, list[int]],
    cfg: DatasetsConfig,
) -> dict[str, Any]:
    ref = shards[0].info
    components = list(ref["components"])
    train_steps = steps.join(
        episodes.filter(pl.col("split") == "train").select("episode_id"),
        on="episode_id",
        how="semi",
    )
    stats_rows = train_steps if train_steps.height else steps
    layout = ObservationLayout(int(ref["image_dim"]), int(ref["text_dim"]))
    extra = {
        k: v
        for k, v in ref.items()
        if k not in {"files", "shard_index", "n_episodes", "n_steps", "schema_version"}
        and not k.startswith("has_")
    }
    return {
        **extra,
        "built_by": BUILT_BY,
        "schema_version": SCHEMA_VERSION,
        "layout_version": LAYOUT_VERSION,
        "observation": layout.to_dict(),
        "observation_order": ["image_features", "text_features", "time_embedding", "quality"],
        "components": components,
        "component_stats": component_stats({c: stats_rows[c].to_numpy() for c in components}),
        "component_stats_split": "train" if train_steps.height else "all",
        "arrays": shapes,
        "counts": {
            "shards": len(shards),
            "episodes": episodes.height,
            "root_episodes": episodes.filter(pl.col("parent_episode_id").is_null()).height,
            "steps": steps.height,
            "episodes_per_rl_split": dict(
                episodes.group_by("rl_split").len().sort("rl_split").iter_rows()
            ),
        },
        "rl_split": {"val_fraction": cfg.val_fraction, "seed": cfg.split_seed, "by": "prompt_text"},
        "source_shards": [int(s.info["shard_index"]) for s in shards],
    }


def build_dataset(
    store_dir: Path, out_dir: Path, cfg: DatasetsConfig, allow_incomplete: bool = False
) -> Path:
    """Verify the store as a whole and every complete shard of ``store_dir``, and merge them into
    ``out_dir``. ``allow_incomplete``: build past missing shards and shard folders without
    ``shard.json`` (the shards present); copied, renamed, changed or mixed shards always stop it."""
    store_dir, out_dir = Path(store_dir), Path(out_dir)
    check_out(out_dir, store_dir)
    paths = shard_paths(store_dir)
    found = store_problems(store_dir) if store_dir.is_dir() else []
    if not paths and not found:
        raise BuildError(
            f"{store_dir} holds no complete shard (shard-NNNNN/ with shard.json); "
            "run `addiffusion collect` first"
        )
    in_shards = [p for path in paths for p in validate_shard(path)]
    across = [p for kind, p in found if not (allow_incomplete and kind in INCOMPLETE)]
    problems = in_shards + across
    if problems:
        listing = "\n  ".join(str(p) for p in problems[:20])
        only_incomplete = not in_shards and all(kind in INCOMPLETE for kind, _ in found)
        hint = (
            "; --allow-incomplete builds the shards present" if across and only_incomplete else ""
        )
        raise BuildError(
            f"{len(problems)} problem(s) in {store_dir}; nothing was written{hint}:\n  {listing}"
        )
    shards = [read_shard(p) for p in paths]
    _check_consistent(shards)
    episodes, steps = _merged_tables(shards, cfg)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        (tmp / "meta").mkdir()
        ep_schema = pa.schema(
            list(EPISODES_SCHEMA)
            + [pa.field("shard", pa.int64()), pa.field("rl_split", pa.string())]
        )
        st_schema = steps_schema(
            list(shards[0].info["components"]), "block_profile" in shards[0].info
        )
        split_of = episodes.select("episode_id", pl.col("split").alias("_split"))
        counts = _write_tables(tmp, "episodes", episodes, split_of, ep_schema, cfg.chunk_rows)
        _write_tables(tmp, "steps", steps, split_of, st_schema, cfg.chunk_rows)
        shapes = _write_arrays(tmp, shards, cfg)
        if cfg.write_webdataset:
            _write_webdataset(tmp, shards, episodes, steps, st_schema)
        info = _info(shards, episodes, steps, shapes, cfg)
        splits = [s for s in ("train", "heldout") if counts[s]]
        (tmp / "README.md").write_text(dataset_card(info, splits, cfg))
        info["files"] = file_checksums(tmp, exclude=("meta/info.json",))
        (tmp / "meta" / "info.json").write_text(json.dumps(info, indent=2))
        swap_in(tmp, out_dir, store_dir)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        if isinstance(e, OSError) and e.errno == errno.ENOSPC:
            raise BuildError(
                f"no space left on the device of {out_dir.parent} while writing the dataset; "
                f"nothing was written and {out_dir} is as it was: free space and rerun"
            ) from e
        raise
    return out_dir
