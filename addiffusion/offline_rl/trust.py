"""The trust root for ``.d3`` policies: which pickles may be unpickled.

A ``.d3`` file is a pickle and runs code when loaded, and anything written beside it (its
``manifest.json``) can be rewritten by whoever can write the file. So a ``.d3`` is loaded only
when its hash was recorded somewhere the writer of its folder does not control:

1. **dvc.lock** of the DVC project holding the working directory (found as DVC finds it: the
   nearest parent with a ``.dvc`` folder). The file must be a declared out of a stage, and its
   md5 the one recorded there: a file out's ``md5``, or, for a directory out (``md5: ….dir``),
   the file's entry in the listing DVC keeps in its cache
   (``.dvc/cache/files/md5/xx/….dir``, itself checked against that md5). dvc.lock is part of
   the project checkout (tracked in git, beside dvc.yaml and the code); the project is looked up
   from the working directory, never from the file, so a ``dvc.lock`` dropped beside a ``.d3``
   counts for nothing.
2. **The trust store**: a per-user JSON file (``$ADDIFFUSION_TRUST_STORE``, else
   ``$XDG_DATA_HOME/addiffusion/trusted.json``, else ``~/.local/share/addiffusion/trusted.json``)
   holding the sha256 of every ``.d3`` that ``offline-rl train`` wrote on this machine and of
   each that the user trusted explicitly (``addiffusion offline-rl trust PATH``).
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from addiffusion.config import UserError

STORE_ENV = "ADDIFFUSION_TRUST_STORE"
STORE_FORMAT = "addiffusion.trust/1"


class TrustStoreError(UserError, RuntimeError):
    """The trust store cannot be read or written."""


def store_path() -> Path:
    """Where the trust store lives (see the module docstring)."""
    if os.environ.get(STORE_ENV):
        return Path(os.environ[STORE_ENV])
    data = os.environ.get("XDG_DATA_HOME") or str(Path.home() / ".local" / "share")
    return Path(data) / "addiffusion" / "trusted.json"


def read_store(path: Path | None = None) -> dict[str, dict[str, Any]]:
    """sha256 -> record (``path``, ``source``, ``added``); empty when the store does not exist."""
    path = store_path() if path is None else Path(path)
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TrustStoreError(
            f"trust store {path} is unreadable ({e}); fix or delete it (then retrain, or trust "
            "your policies again with `addiffusion offline-rl trust PATH`)"
        ) from e
    if not isinstance(data, dict) or data.get("format") != STORE_FORMAT:
        raise TrustStoreError(f"{path} is not an addiffusion trust store (format {STORE_FORMAT})")
    entries = data.get("sha256")
    if not isinstance(entries, dict):
        raise TrustStoreError(f"trust store {path} has no 'sha256' table")
    return entries


@contextmanager
def _locked(path: Path):
    """An exclusive lock on ``path``'s ``.lock`` sibling, so that concurrent trainers each add
    their entry (no lock where ``fcntl`` is missing)."""
    try:
        import fcntl
    except ImportError:  # not POSIX: last writer wins
        yield
        return
    with open(path.with_name(path.name + ".lock"), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def record(file: Path, sha256: str, source: str, store: Path | None = None) -> Path:
    """Add ``sha256`` (of ``file``) to the trust store; returns the store's path."""
    store = store_path() if store is None else Path(store)
    try:
        store.parent.mkdir(parents=True, exist_ok=True)
        with _locked(store):
            entries = read_store(store)
            entries[sha256] = {
                "path": os.path.abspath(file),
                "source": source,
                "added": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            }
            tmp = store.with_name(f".{store.name}.tmp-{os.getpid()}")
            tmp.write_text(
                json.dumps({"format": STORE_FORMAT, "sha256": entries}, indent=1) + "\n",
                encoding="utf-8",
            )
            os.replace(tmp, store)
    except OSError as e:
        raise TrustStoreError(f"cannot write the trust store {store}: {e}") from e
    return store


def dvc_root(start: Path | None = None) -> Path | None:
    """The DVC project holding ``start`` (default: the working directory), as DVC finds it."""
    here = Path(os.path.abspath(start if start is not None else os.getcwd()))
    for d in (here, *here.parents):
        if (d / ".dvc").is_dir():
            return d
    return None


@dataclass(frozen=True)
class LockEntry:
    """What dvc.lock records for one file: the stage that wrote it and its md5."""

    lock: Path
    stage: str
    md5: str | None
    """None when the file lies in a directory out whose listing is not in the cache."""


def dvc_lock_entry(file: Path, root: Path | None = None) -> LockEntry | None:
    """The md5 that the project's dvc.lock records for ``file`` as a stage output, or None when
    ``file`` is not inside the project or is no declared out (nor inside one)."""
    root = dvc_root() if root is None else root
    if root is None or not (root / "dvc.lock").is_file():
        return None
    rel = Path(os.path.relpath(os.path.abspath(file), root)).as_posix()
    if rel.startswith("../"):
        return None
    lock_path = root / "dvc.lock"
    try:
        lock = yaml.safe_load(lock_path.read_text(encoding="utf-8")) or {}
    except (OSError, UnicodeDecodeError, yaml.YAMLError):
        return None
    for stage, body in (lock.get("stages") or {}).items():
        for out in (body or {}).get("outs") or []:
            out_path = str(out.get("path", "")).rstrip("/")
            # DVC 3 writes `hash: md5` (raw md5); older entries hash text files after dos2unix.
            if not out_path or out.get("hash") != "md5" or not isinstance(out.get("md5"), str):
                continue
            if rel == out_path and not out["md5"].endswith(".dir"):
                return LockEntry(lock_path, str(stage), out["md5"])
            if rel.startswith(out_path + "/") and out["md5"].endswith(".dir"):
                listing = _dir_listing(root, out["md5"])
                inner = rel[len(out_path) + 1 :]
                md5 = None if listing is None else listing.get(inner)
                return LockEntry(lock_path, str(stage), md5)
    return None


def _dir_listing(root: Path, dir_md5: str) -> dict[str, str] | None:
    """relpath -> md5 from DVC's cache entry of a directory out, if present and intact (its
    md5 is the directory's hash: ``md5(json.dumps(listing, sort_keys=True))``)."""
    digest = dir_md5.removesuffix(".dir")
    path = root / ".dvc" / "cache" / "files" / "md5" / digest[:2] / (digest[2:] + ".dir")
    try:
        data = path.read_bytes()
    except OSError:
        return None
    if hashlib.md5(data).hexdigest() != digest:
        return None
    try:
        return {str(e["relpath"]): str(e["md5"]) for e in json.loads(data)}
    except (ValueError, TypeError, KeyError):
        return None


def trusted_by(file: Path, data: bytes) -> str | None:
    """Why ``data`` (the bytes of ``file``) may be unpickled, or None if nothing vouches for it.

    Raises :class:`TrustStoreError` when the trust store exists but is unreadable.
    """
    entry = dvc_lock_entry(file)
    if entry is not None and entry.md5 == hashlib.md5(data).hexdigest():
        return f"{entry.lock} records it as an output of stage {entry.stage!r}"
    sha = hashlib.sha256(data).hexdigest()
    if sha in (entries := read_store()):
        return f"trust store {store_path()} ({entries[sha].get('source', 'unknown source')})"
    return None


def untrusted_detail(file: Path) -> str:
    """Where the hash of ``file`` was looked for, for the refusal message."""
    root = dvc_root()
    entry = dvc_lock_entry(file, root)
    if root is None:
        where = "the working directory is in no DVC project"
    elif entry is None:
        where = f"{root / 'dvc.lock'} records no such stage output"
    elif entry.md5 is None:
        where = f"{entry.lock} stage {entry.stage!r}: its directory listing is not in the cache"
    else:
        where = f"{entry.lock} stage {entry.stage!r} recorded md5 {entry.md5}"
    return f"{where}; not in the trust store {store_path()}"
