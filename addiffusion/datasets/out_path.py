"""Where ``datasets build`` may write: never over something it did not build.

``--out`` must be absent, an empty folder, or a dataset this command built (its manifest,
``meta/info.json``, says ``built_by`` and lists every file in the folder). Never the store, a folder
inside or around it, a file, a link, or a folder holding anything else: those are refused before
any work, naming the path. The new dataset is assembled beside ``--out`` and swapped in atomically
(``renameat2(RENAME_EXCHANGE)`` on Linux; two renames elsewhere).
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
from pathlib import Path

from addiffusion.config import UserError

BUILT_BY = "addiffusion datasets build"
"""``meta/info.json["built_by"]``: marks a folder that ``build`` may replace (see :func:`check_out`)."""


class OutPathError(UserError, ValueError):
    """``--out`` names a path that ``build`` must not write to (it would destroy something)."""


def _built_here(out: Path) -> str | None:
    """None when ``out`` is a dataset this command built and nothing else (its manifest,
    ``meta/info.json``, carries :data:`BUILT_BY` and lists every other file); else why not."""
    try:
        info = json.loads((out / "meta" / "info.json").read_text())
    except (OSError, ValueError):
        return "it holds files and no readable meta/info.json"
    if not isinstance(info, dict) or info.get("built_by") != BUILT_BY:
        return f"its meta/info.json has no built_by: {BUILT_BY!r}"
    listed = set(info.get("files") or {}) | {"meta/info.json"}
    for p in sorted(out.rglob("*")):
        if not p.is_dir() and p.relative_to(out).as_posix() not in listed:
            return f"it holds {p}, which its manifest does not list"
    return None


def check_out(out: Path, store_dir: Path) -> None:
    """Refuse an ``out`` that ``build`` would destroy: the store, a folder inside it or holding
    it, a file or link, a folder that is neither empty nor a dataset built here."""
    out_r, store_r = out.resolve(), Path(store_dir).resolve()
    what = (
        "the store itself"
        if out_r == store_r
        else "a folder holding the store"
        if out_r in store_r.parents
        else "inside the store"
        if store_r in out_r.parents
        else None
    )
    if what:
        raise OutPathError(
            f"--out {out} is {what} ({store_dir}); build writes a new folder: choose an --out "
            "outside the store, e.g. data/dataset"
        )
    if out.is_symlink() or (out.exists() and not out.is_dir()):
        raise OutPathError(
            f"--out {out} is a file, not a dataset folder; build never replaces it: "
            "choose another --out or remove the file yourself"
        )
    if out.is_dir() and any(out.iterdir()):
        why = _built_here(out)
        if why:
            raise OutPathError(
                f"--out {out} is a folder that build did not write ({why}); build writes only to "
                "a new or empty folder or over a dataset it built: choose another --out"
            )


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two paths (Linux ``renameat2(RENAME_EXCHANGE)``); False if unsupported."""
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    at_fdcwd, rename_exchange = -100, 2
    if fn(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(err, os.strerror(err), str(b))


def swap_in(tmp: Path, out: Path, store_dir: Path) -> None:
    """Put ``tmp`` in place of ``out`` (absent, empty, or a dataset built here): in one atomic
    step where the filesystem can; the old dataset is removed only after the new one is in."""
    check_out(out, store_dir)  # again: the folder may have changed during the build
    if not out.exists() or not any(out.iterdir()):
        os.replace(tmp, out)  # onto nothing or an empty folder: one atomic rename
        return
    if _exchange(tmp, out):
        shutil.rmtree(tmp)  # tmp now holds the old dataset
        return
    old = out.parent / f".{out.name}.old-{os.getpid()}"
    os.rename(out, old)
    os.rename(tmp, out)
    shutil.rmtree(old)
