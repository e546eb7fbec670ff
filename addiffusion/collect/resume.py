"""What makes a store safe to resume: one collect config per store, one process per rank.

**Resume guard.** A store records the settings its episodes come from: its manifest
(``collect.json``, written once by the first collector: :func:`addiffusion.datasets.store.init_store`)
and ``collect_config`` in every ``shard.json``. A collector whose settings differ in any key that changes the episodes
(:func:`episode_config`, plus a hash of the planned prompts x seeds, so an edited prompt file
counts) is refused before it writes anything, naming each key with both values: resuming would
otherwise skip the shards collected under the old settings and mix two configs in one store. Only
:data:`RESUMABLE_KEYS` may change between runs on one store.

**Rank locks.** Rank r of W writes shards r, r+W, ...; two processes on one rank would write the
same shards. Each collector holds ``<store>/.locks/rank-<r>-of-<W>.lock`` with ``fcntl.flock``
(exclusive, non-blocking) while it runs, and a second collector on that rank is refused. So is a
collector whose world size differs from one running on the store (their ranks overlap). The
kernel drops a flock when its process exits, however it exits (SIGKILL, OOM), so a lock is never
stale: a lock file left by a killed collector is held by no one and the next collector takes it;
a collector that ends removes its lock file. Locks work where ``flock`` does: local disks, and NFS
on Linux (emulated with byte-range locks); a node that dies without its NFS client releasing
the lock holds it until the server's lease expires. Where the filesystem refuses locks (Lustre
mounted without ``-o flock``), the collector warns and runs unlocked: shard commits still never
overwrite a complete shard.
"""

from __future__ import annotations

import dataclasses
import errno
import fcntl
import hashlib
import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

from addiffusion.collect.config import CollectConfig
from addiffusion.config import UserError
from addiffusion.datasets.store import (
    STORE_MANIFEST,
    init_store,
    read_store_manifest,
    shard_paths,
)

LOCK_DIR = ".locks"

RESUMABLE_KEYS = ("device", "batch_size")
"""Collect keys that may change between runs on one store: where and how many episodes are
denoised at once. Neither changes which episodes, seeds or paths a shard holds (the behaviour
policy is seeded per episode); batch composition may move float rounding in the last bits, as a
different device does. Every other key (the model, scorer, scheduler, sampler grid, behaviour
policy, prompts, seeds, shard_size, record_latents / record_thumbnails) decides what the store
holds and is compared."""


class StoreConflict(UserError):
    """The store cannot be resumed with these settings, or its rank is taken."""


def episode_config(cfg: CollectConfig) -> dict[str, Any]:
    """The collect keys that decide a store's contents, as JSON values: every key but
    :data:`RESUMABLE_KEYS`, and a learned scorer's checkpoint or the preview decoder only when
    it is used."""
    out = {
        f.name: getattr(cfg, f.name)
        for f in dataclasses.fields(cfg)
        if f.name not in RESUMABLE_KEYS
    }
    unused = {
        "imagereward": ("imagereward",),
        "pickscore": ("pickscore_model", "pickscore_processor"),
    }
    for scorer, keys in unused.items():
        if scorer not in cfg.scorers:
            for k in keys:
                out.pop(k)
    if cfg.observe_with != "preview":
        out.pop("preview")
    return json.loads(json.dumps(out))  # tuples -> lists, as read back from JSON


def plan_sha256(episodes: list[tuple[str, str, int, str]]) -> str:
    """sha256 of the planned episodes ``(episode id, prompt text, seed, split)``: the prompts a
    config names can change without the config (an edited prompt file)."""
    return hashlib.sha256(json.dumps(episodes).encode()).hexdigest()


def _differences(recorded: dict[str, Any], current: dict[str, Any]) -> list[str]:
    missing = "(not recorded)"
    out = [
        f"collect.{k} is {current.get(k, missing)!r} in params but "
        f"{recorded.get(k, missing)!r} in the store"
        for k in sorted((set(recorded) | set(current)) - {"plan_sha256"})
        if recorded.get(k, missing) != current.get(k, missing)
    ]
    if not out:  # the same keys, other episodes: only the prompt source can say why
        out.append(
            "the planned episodes (prompt texts x seeds) differ although every key is the same: "
            f"was the prompt file {current.get('prompts')!r} changed?"
        )
    return out


def check_store_config(store_dir: Path, config: dict[str, Any], n_shards: int) -> None:
    """Refuse ``config`` (:func:`episode_config` plus ``plan_sha256``) unless ``store_dir`` was
    collected with the same; record it in the store manifest if the store is new.

    ``n_shards``: how many shards the complete store holds. Raises :class:`StoreConflict`
    naming every differing key, with both values and what to do.
    """
    store_dir = Path(store_dir)
    manifest = read_store_manifest(store_dir)
    if manifest is not None and manifest["config"] != config and not _has_shards(store_dir):
        # Settings recorded by a run that failed before its first shard (a bad scorer path, say):
        # nothing was collected under them, so the corrected run records its own.
        (store_dir / STORE_MANIFEST).unlink(missing_ok=True)
        manifest = None
    if manifest is not None:
        if manifest["config"] != config:
            raise _refuse(store_dir, STORE_MANIFEST, _differences(manifest["config"], config))
    else:
        # A store without a manifest: its shards (if any) must say they are of this config.
        for shard in shard_paths(store_dir):
            try:
                recorded = json.loads((shard / "shard.json").read_text()).get("collect_config")
            except (OSError, ValueError, AttributeError) as e:
                raise StoreConflict(
                    f"{shard / 'shard.json'} cannot be read ({e}); delete {shard} and rerun to "
                    "redo it"
                ) from e
            if recorded is None:
                raise StoreConflict(
                    f"{shard / 'shard.json'} records no collect settings (collected by an older "
                    "version), so resuming cannot be checked: collect into a new --store, or "
                    f"delete {store_dir} to start over"
                )
            if recorded != config:
                raise _refuse(store_dir, shard.name, _differences(recorded, config))
    init_store(store_dir, config, n_shards)


def _has_shards(store_dir: Path) -> bool:
    """Whether any shard of ``store_dir`` was committed or is being written (a tmp folder)."""
    return any(p.is_dir() and p.name.startswith("shard-") for p in store_dir.iterdir())


def _refuse(store_dir: Path, where: str, diffs: list[str]) -> StoreConflict:
    return StoreConflict(
        f"{store_dir} was collected with other settings ({where}): {'; '.join(diffs)}. "
        "Resuming would mix episodes of two configs in one store: collect into a new --store, "
        f"or delete {store_dir} to start over (only collect.{' and collect.'.join(RESUMABLE_KEYS)} "
        "may change on resume)"
    )


class RankLock:
    """Hold rank ``rank`` of ``world_size`` on ``store_dir`` (see the module docstring).

    Use as a context manager; raises :class:`StoreConflict` if the rank is held, or if a
    collector with another world size runs on the store. The lock file is removed on release."""

    def __init__(self, store_dir: Path, rank: int, world_size: int) -> None:
        self.dir = Path(store_dir) / LOCK_DIR
        self.rank, self.world_size = rank, world_size
        self.path = self.dir / f"rank-{rank:05d}-of-{world_size:05d}.lock"
        self.fd: int | None = None

    def __enter__(self) -> RankLock:
        store = self.dir.parent
        if store.exists() and not store.is_dir():
            raise StoreConflict(f"--store {store} is a file; give a folder (new, or a store)")
        self.dir.mkdir(parents=True, exist_ok=True)
        while self.fd is None:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                os.close(fd)
                raise StoreConflict(
                    f"rank {self.rank} of {self.world_size} is taken by another collector on "
                    f"this store ({_owner(self.path)}; lock {self.path}): two collectors on one "
                    "rank would write the same shards. Wait for it to finish, or give this one "
                    "another --rank"
                ) from None
            except OSError as e:
                if e.errno not in (errno.ENOLCK, errno.EOPNOTSUPP, errno.ENOSYS):
                    os.close(fd)
                    raise
                warnings.warn(
                    f"{self.path}: the filesystem refuses file locks ({e.strerror}); collecting "
                    "without a rank lock, so make sure no other collector has this rank",
                    stacklevel=2,
                )
            # A releasing holder may have unlinked the file between our open and flock: then
            # we hold a lock on a file no one else can find; start over.
            try:
                same = os.stat(self.path).st_ino == os.fstat(fd).st_ino
            except FileNotFoundError:
                same = False
            if same:
                self.fd = fd
            else:
                os.close(fd)
        os.ftruncate(self.fd, 0)
        os.write(
            self.fd,
            f"host {socket.gethostname()} pid {os.getpid()} since "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n".encode(),
        )
        try:
            self._refuse_other_world_sizes()
        except BaseException:
            self.release()
            raise
        return self

    def _refuse_other_world_sizes(self) -> None:
        for other in sorted(self.dir.glob("rank-*-of-*.lock")):
            if other.name.endswith(f"-of-{self.world_size:05d}.lock"):
                continue
            try:
                fd = os.open(other, os.O_RDONLY)
            except FileNotFoundError:
                continue
            try:
                # A shared probe fails only while a live collector holds the file.
                fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
            except BlockingIOError:
                raise StoreConflict(
                    f"a collector with another world size runs on this store ({_owner(other)}; "
                    f"lock {other}): ranks of different world sizes write overlapping shards. "
                    f"Use --world-size the same for every collector, or wait for it to finish"
                ) from None
            except OSError:
                pass  # no locks on this filesystem: nothing to learn
            finally:
                os.close(fd)

    def release(self) -> None:
        if self.fd is None:
            return
        # Unlink while still holding the lock (see the inode check in __enter__).
        self.path.unlink(missing_ok=True)
        os.close(self.fd)
        self.fd = None

    def __exit__(self, *exc: object) -> None:
        self.release()


def _owner(path: Path) -> str:
    try:
        return path.read_text().strip() or "owner unknown"
    except OSError:
        return "owner unknown"
