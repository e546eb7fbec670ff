"""The sharded trajectory store: one writer per shard, atomic commit by rename, checksummed files.

A collector process owns the shard indices it writes (rank r of W writes r, r+W, ...). A shard is
assembled in memory, written under ``shard-<k:05d>.tmp-<pid>`` and renamed to ``shard-<k:05d>``
only when every file and its sha256 is on disk, so a reader never sees half a shard and a
restarted collector can trust :func:`completed_shards`. Layout: see :mod:`addiffusion.datasets.schema`.

What a store should hold is recorded beside the shards, so that a lost, copied or renamed shard
shows (:mod:`addiffusion.datasets.completeness`): ``collect.json`` (written once, before the
first shard, by the collector's resume guard or :func:`init_store`: the episode-defining config,
its hash and the number of shards planned) and ``shards.jsonl`` (one line per committed shard: index, sha256 of its
``shard.json``, config hash; appended by :meth:`ShardWriter.commit`). Every shard's ``shard.json``
carries the store's ``config_hash``.
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import re
import shutil
import tarfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pyarrow as pa
import pyarrow.parquet as pq
import zarr
from PIL import Image

from addiffusion.config import UserError
from addiffusion.datasets.schema import (
    BLOCK_PROFILE_FIELDS,
    EPISODES_SCHEMA,
    JSON_ROOT_PARENT,
    SCHEMA_VERSION,
    STEPS_SCHEMA,
)

SHARD_RE = re.compile(r"^shard-(\d{5,})$")
SHARD_TMP_RE = re.compile(r"^shard-(\d{5,})\.tmp-.+$")
REQUIRED_INFO = ("components", "image_dim", "text_dim")
STORE_MANIFEST = "collect.json"
"""What the store should hold: the collector's record (:mod:`addiffusion.collect.resume`)."""
SHARD_LEDGER = "shards.jsonl"
ZARR_CHUNK_ROWS = 64
"""Rows per Zarr chunk inside a shard file (features are read by row ranges)."""


def sha256_file(path: Path) -> str:
    h = hashlib.sha256()
    with path.open("rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def file_checksums(root: Path, exclude: tuple[str, ...] = ()) -> dict[str, str]:
    """sha256 of every file under ``root`` keyed by POSIX relative path (sorted)."""
    out = {}
    for p in sorted(root.rglob("*")):
        rel = p.relative_to(root).as_posix()
        if p.is_file() and rel not in exclude:
            out[rel] = sha256_file(p)
    return out


def config_hash(config: dict[str, Any]) -> str:
    """sha256 of the JSON of ``config`` with sorted keys (as the collector's resume guard)."""
    text = json.dumps(config, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()


class StoreMismatch(UserError, ValueError):
    """A store was collected under another config than the one given."""


def read_store_manifest(store_dir: Path) -> dict[str, Any] | None:
    """The store's ``collect.json``, or None for a store without one (written before it existed)."""
    path = Path(store_dir) / STORE_MANIFEST
    if not path.exists():
        return None
    try:
        manifest = json.loads(path.read_text())
        if not isinstance(manifest, dict):
            raise ValueError("not a JSON object")
        for key in ("config", "config_hash", "n_shards"):
            if key not in manifest:
                raise ValueError(f"no {key!r}")
    except ValueError as e:
        raise StoreMismatch(
            f"{path}: unreadable store manifest ({e}); it is written by `addiffusion collect`: "
            "restore it or collect into a new store"
        ) from e
    return manifest


def init_store(store_dir: Path, config: dict[str, Any], n_shards: int) -> dict[str, Any]:
    """Record what ``store_dir`` should hold (``collect.json``), or check that it records the same.

    ``config``: every setting that changes the episodes (JSON-able); ``n_shards``: how many shards
    the full collection has. Created atomically and exclusively (``os.link``), so ranks starting
    together agree on one manifest. Raises :class:`StoreMismatch` naming the first key that
    differs from the recorded one.
    """
    store_dir = Path(store_dir)
    config = json.loads(json.dumps(config))
    manifest = {
        "schema_version": SCHEMA_VERSION,
        "config_hash": config_hash(config),
        "n_shards": int(n_shards),
        "config": config,
    }
    store_dir.mkdir(parents=True, exist_ok=True)
    path = store_dir / STORE_MANIFEST
    _drop_dead_tmp_manifests(store_dir)
    if not path.exists():
        tmp = store_dir / f".{STORE_MANIFEST}.tmp-{os.getpid()}"
        try:
            tmp.write_text(json.dumps(manifest, indent=2))
            os.link(tmp, path)
        except FileExistsError:
            pass
        finally:
            tmp.unlink(missing_ok=True)
    recorded = read_store_manifest(store_dir)
    assert recorded is not None
    old, new = recorded["config"], {**config, "n_shards": int(n_shards)}
    old = {**old, "n_shards": recorded["n_shards"]}
    for key in sorted(set(old) | set(new)):
        if old.get(key) != new.get(key):
            raise StoreMismatch(
                f"{path}: the store was collected with {key} = {old.get(key)!r}, this run has "
                f"{new.get(key)!r}; collect into a new store (or restore the setting)"
            )
    return recorded


def _drop_dead_tmp_manifests(store_dir: Path) -> None:
    """Remove ``.collect.json.tmp-<pid>`` files of processes that no longer run (a collector
    killed while creating the manifest); a live process's file is left to it."""
    for tmp in store_dir.glob(f".{STORE_MANIFEST}.tmp-*"):
        try:
            pid = int(tmp.name.rsplit("-", 1)[1])
            os.kill(pid, 0)
        except ProcessLookupError:
            tmp.unlink(missing_ok=True)
        except (ValueError, PermissionError):
            continue


def steps_schema(components: list[str], block_profile: bool = False) -> pa.Schema:
    """STEPS_SCHEMA plus one float32 column per raw reward component, plus
    BLOCK_PROFILE_FIELDS when the shard has a ``block_profile``."""
    extra = [pa.field(*f) for f in BLOCK_PROFILE_FIELDS] if block_profile else []
    clash = sorted(set(components) & set(STEPS_SCHEMA.names + [f.name for f in extra]))
    if clash:
        raise ValueError(f"component name {clash[0]!r} clashes with a steps column")
    return pa.schema(list(STEPS_SCHEMA) + [pa.field(c, pa.float32()) for c in components] + extra)


def write_sharded_array(
    group: zarr.Group, name: str, data: np.ndarray, chunk_rows: int = ZARR_CHUNK_ROWS
) -> None:
    """Write ``data`` (rows first) as a Zarr v3 array with the sharding codec: chunks of
    ``chunk_rows`` rows, all chunks of this array in one shard file (one writer, one write)."""
    rows = max(int(data.shape[0]), 1)
    chunk = min(chunk_rows, rows)
    shard_rows = -(-rows // chunk) * chunk
    arr = group.create_array(
        name,
        shape=data.shape,
        dtype=data.dtype,
        chunks=(chunk, *data.shape[1:]),
        shards=(shard_rows, *data.shape[1:]),
    )
    if data.shape[0]:
        arr[...] = data


def filmstrip_png(thumbnails: np.ndarray) -> bytes:
    """``(n, H, W, 3) uint8`` -> one PNG strip ``H x (n*W)`` (one image per episode streams
    and previews well on the Hub)."""
    strip = np.concatenate(list(thumbnails), axis=1)
    buf = io.BytesIO()
    Image.fromarray(strip).save(buf, format="PNG")
    return buf.getvalue()


def add_tar_member(tar: tarfile.TarFile, name: str, payload: bytes) -> None:
    member = tarfile.TarInfo(name)
    member.size = len(payload)
    member.mtime = 0  # deterministic tars: same data, same sha256
    tar.addfile(member, io.BytesIO(payload))


class ShardWriter:
    """Collects episodes of one shard in memory and commits them atomically.

    ``info`` (JSON-able) is the shard metadata from the collector; it needs at least
    ``components`` (raw reward component names), ``image_dim`` and ``text_dim``.
    Creating a writer removes stale ``shard-<k>.tmp-*`` folders of the same index: the index is
    owned by one process, so any such folder is a crashed earlier attempt.
    """

    def __init__(self, store_dir: Path, shard_index: int, info: dict[str, Any]) -> None:
        missing = [k for k in REQUIRED_INFO if k not in info]
        if missing:
            raise ValueError(f"shard info lacks {missing} (got keys {sorted(info)})")
        if shard_index < 0:
            raise ValueError(f"shard_index must be >= 0, got {shard_index}")
        self.store_dir = Path(store_dir)
        self.index = int(shard_index)
        self.info = json.loads(json.dumps(info))  # a JSON-able deep copy, or fail now
        self.components = list(info["components"])
        self.schema = steps_schema(self.components, "block_profile" in info)
        self.image_dim, self.text_dim = int(info["image_dim"]), int(info["text_dim"])
        self._episodes: list[dict[str, Any]] = []
        self._steps: list[dict[str, Any]] = []
        self._image: list[np.ndarray] = []
        self._text: list[np.ndarray] = []
        self._thumbs: list[np.ndarray] = []
        self._latents: list[np.ndarray] = []
        self._n_steps = 0
        self.store_dir.mkdir(parents=True, exist_ok=True)
        manifest = read_store_manifest(self.store_dir)
        if manifest is not None:
            self.info["config_hash"] = manifest["config_hash"]
        for p in self.store_dir.glob(f"shard-{self.index:05d}.tmp-*"):
            shutil.rmtree(p, ignore_errors=True)

    @property
    def final_path(self) -> Path:
        return self.store_dir / f"shard-{self.index:05d}"

    def add_episode(
        self,
        episode: dict[str, Any],
        steps: list[dict[str, Any]],
        image_features: np.ndarray,
        text_features: np.ndarray,
        thumbnails: np.ndarray | None = None,
        latents: np.ndarray | None = None,
    ) -> None:
        """Add one episode (a root or a refine branch).

        episode: EPISODES_SCHEMA fields except ``text_row``; steps: one dict per step with the
        STEPS_SCHEMA fields except ``feature_row`` plus one float per component;
        image_features: (n_steps, image_dim) float32; text_features: (text_dim,) float32;
        thumbnails: (n_steps, H, W, 3) uint8 or None; latents: (n_steps, C, h, w) float16 or None.
        Thumbnails and latents must be given for all episodes of a shard or for none.
        """
        eid = episode.get("episode_id")
        where = f"shard {self.index} episode {eid!r}"
        need_ep = [n for n in EPISODES_SCHEMA.names if n != "text_row" and n not in episode]
        if need_ep:
            raise ValueError(f"{where}: episode lacks field(s) {need_ep}")
        n = len(steps)
        if n == 0 or episode["num_steps"] != n:
            raise ValueError(f"{where}: num_steps={episode['num_steps']} but {n} step rows given")
        step_fields = [f for f in self.schema.names if f != "feature_row"]
        for j, row in enumerate(steps):
            missing = [f for f in step_fields if f not in row]
            if missing:
                raise ValueError(f"{where} step row {j}: lacks field(s) {missing}")
            if row["episode_id"] != eid:
                raise ValueError(f"{where} step row {j}: episode_id {row['episode_id']!r}")
        image_features = np.asarray(image_features, dtype=np.float32)
        text_features = np.asarray(text_features, dtype=np.float32)
        if image_features.shape != (n, self.image_dim):
            raise ValueError(
                f"{where}: image_features must be ({n}, {self.image_dim}), "
                f"got {image_features.shape}"
            )
        if text_features.shape != (self.text_dim,):
            raise ValueError(
                f"{where}: text_features must be ({self.text_dim},), got {text_features.shape}"
            )
        for name, arr, store in (
            ("thumbnails", thumbnails, self._thumbs),
            ("latents", latents, self._latents),
        ):
            if (arr is None) != (not store) and self._episodes:
                raise ValueError(f"{where}: {name} given for some episodes of the shard only")
            if arr is not None:
                want = np.uint8 if name == "thumbnails" else np.float16
                if arr.dtype != want:  # a silent cast would turn [0, 1] floats into black images
                    raise ValueError(f"{where}: {name} must be {np.dtype(want)}, got {arr.dtype}")
                if arr.shape[0] != n or (store and arr.shape[1:] != store[0].shape[1:]):
                    raise ValueError(f"{where}: {name} shape {arr.shape} does not fit")
        text_row = len(self._episodes)
        self._episodes.append(
            {
                **{k: episode[k] for k in EPISODES_SCHEMA.names if k != "text_row"},
                "text_row": text_row,
            }
        )
        for j, row in enumerate(steps):
            self._steps.append(
                {**{f: row[f] for f in step_fields}, "feature_row": self._n_steps + j}
            )
        self._n_steps += n
        self._image.append(image_features)
        self._text.append(text_features)
        if thumbnails is not None:
            self._thumbs.append(np.asarray(thumbnails, dtype=np.uint8))
        if latents is not None:
            self._latents.append(np.asarray(latents, dtype=np.float16))

    def _write_files(self, tmp: Path) -> None:
        episodes = pa.Table.from_pylist(self._episodes, schema=EPISODES_SCHEMA)
        steps = pa.Table.from_pylist(self._steps, schema=self.schema)
        pq.write_table(episodes, tmp / "episodes.parquet")
        pq.write_table(steps, tmp / "steps.parquet")
        group = zarr.open_group(tmp / "features.zarr", mode="w", zarr_format=3)
        write_sharded_array(group, "image_features", np.concatenate(self._image))
        write_sharded_array(group, "text_features", np.stack(self._text))
        if self._thumbs:
            write_sharded_array(group, "thumbnails", np.concatenate(self._thumbs), 16)
        if self._latents:
            write_sharded_array(group, "latents", np.concatenate(self._latents), 16)
        with tarfile.open(tmp / "episodes.tar", "w") as tar:
            write_episode_samples(tar, episodes, steps, self._thumbs)

    def commit(self) -> Path:
        """Write the shard under a temporary name, checksum it, rename it into place."""
        if not self._episodes:
            raise ValueError(f"shard {self.index}: no episodes added")
        if self.final_path.exists():
            raise FileExistsError(
                f"{self.final_path} already exists: shard {self.index} is written by two "
                "processes (check --rank/--world-size)"
            )
        tmp = self.store_dir / f"shard-{self.index:05d}.tmp-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        try:
            self._write_files(tmp)
            meta = {
                **self.info,
                "schema_version": SCHEMA_VERSION,
                "shard_index": self.index,
                "n_episodes": len(self._episodes),
                "n_steps": self._n_steps,
                "has_thumbnails": bool(self._thumbs),
                "has_latents": bool(self._latents),
                "files": file_checksums(tmp),
            }
            (tmp / "shard.json").write_text(json.dumps(meta, indent=2))
            if "config_hash" in self.info:
                # Recorded before the rename: a kill in between leaves a line for a shard that is
                # not there (a gap, which a rerun fills and re-records; the last line wins), never
                # a complete shard the ledger does not know.
                self._record(sha256_file(tmp / "shard.json"))
            os.rename(tmp, self.final_path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return self.final_path

    def _record(self, digest: str) -> None:
        """Append this shard to the store's ledger: one ``write`` of one short line in append
        mode, so collectors of other ranks appending at once never interleave."""
        line = {
            "shard_index": self.index,
            "sha256": digest,
            "config_hash": self.info["config_hash"],
        }
        fd = os.open(self.store_dir / SHARD_LEDGER, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, (json.dumps(line) + "\n").encode())
        finally:
            os.close(fd)


def episode_record(episode: dict[str, Any], steps: list[dict[str, Any]]) -> dict[str, Any]:
    """The JSON of one episode's WebDataset sample: the episode row plus ``steps`` (its step
    rows). Every field has one JSON type in every sample, so that readers inferring types from the
    first samples (``datasets.load_dataset("webdataset", ...)``) type them right: a root's
    ``parent_episode_id`` is ``JSON_ROOT_PARENT``, and any other null is an error."""
    parent = episode["parent_episode_id"]
    record = {**episode, "parent_episode_id": JSON_ROOT_PARENT if parent is None else parent}
    rows = [("", record)] + [(f" step {j}", row) for j, row in enumerate(steps)]
    for where, row in rows:
        null = next((k for k, v in row.items() if v is None), None)
        if null is not None:
            raise ValueError(
                f"episode {episode['episode_id']!r}{where}: {null} is null; the WebDataset JSON "
                "has no nulls (readers infer each field's type from the first samples)"
            )
    return {**record, "steps": steps}


def episode_from_record(record: dict[str, Any]) -> dict[str, Any]:
    """Inverse of :func:`episode_record`: the episode row as in Parquet (roots' parent null)."""
    parent = record["parent_episode_id"]
    return {**record, "parent_episode_id": None if parent == JSON_ROOT_PARENT else parent}


def write_episode_samples(
    tar: tarfile.TarFile, episodes: pa.Table, steps: pa.Table, thumbs: list[np.ndarray]
) -> None:
    """One WebDataset sample per episode: ``<key>.json`` (:func:`episode_record`) and, with
    thumbnails, ``<key>.png`` (a filmstrip). Keys are episode ids, which contain no dots."""
    steps_by_ep: dict[str, list[dict[str, Any]]] = {}
    for row in steps.to_pylist():
        steps_by_ep.setdefault(row["episode_id"], []).append(row)
    for i, ep in enumerate(episodes.to_pylist()):
        key = ep["episode_id"]
        if "." in key:
            raise ValueError(f"episode_id {key!r} contains a dot (WebDataset keys cannot)")
        record = episode_record(ep, steps_by_ep[key])
        add_tar_member(tar, f"{key}.json", json.dumps(record).encode())
        if thumbs:
            add_tar_member(tar, f"{key}.png", filmstrip_png(thumbs[i]))


def shard_index_of(path: Path) -> int | None:
    m = SHARD_RE.match(path.name)
    return int(m.group(1)) if m else None


def read_ledger(store_dir: Path) -> dict[int, dict[str, Any]]:
    """The last ``shards.jsonl`` line of every shard index (a recollected shard appends again);
    a torn last line (a crash mid-append) is ignored."""
    path = Path(store_dir) / SHARD_LEDGER
    out: dict[int, dict[str, Any]] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                row = json.loads(line)
                out[int(row["shard_index"])] = row
            except (ValueError, KeyError, TypeError):
                continue
    return out


def completed_shards(store_dir: Path) -> set[int]:
    """Indices of complete shards (renamed into place with a shard.json); tmp dirs ignored."""
    store_dir = Path(store_dir)
    if not store_dir.is_dir():
        return set()
    return {
        k
        for p in store_dir.iterdir()
        if p.is_dir() and (k := shard_index_of(p)) is not None and (p / "shard.json").is_file()
    }


def shard_paths(store_dir: Path) -> list[Path]:
    """Complete shard folders in index order."""
    return [Path(store_dir) / f"shard-{k:05d}" for k in sorted(completed_shards(store_dir))]


@dataclass(frozen=True)
class Shard:
    """A complete shard read back: metadata, tables and the path of its Zarr group."""

    path: Path
    info: dict[str, Any]
    episodes: pl.DataFrame
    steps: pl.DataFrame

    @property
    def features(self) -> zarr.Group:
        return zarr.open_group(self.path / "features.zarr", mode="r", zarr_format=3)


def read_shard(path: Path) -> Shard:
    """Read one complete shard (no checksum verification: see ``validate``)."""
    path = Path(path)
    info = json.loads((path / "shard.json").read_text())
    return Shard(
        path=path,
        info=info,
        episodes=pl.read_parquet(path / "episodes.parquet"),
        steps=pl.read_parquet(path / "steps.parquet"),
    )


def read_store(store_dir: Path) -> list[Shard]:
    """All complete shards of a store, in index order (``.tmp-*`` folders are ignored)."""
    return [read_shard(p) for p in shard_paths(store_dir)]
