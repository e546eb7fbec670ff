"""Share built datasets on the Hugging Face Hub, load them back, stream their episodes.

The folder uploaded *is* the built dataset folder (its README.md carries the Hub ``configs``), so
what ``datasets.load_dataset(<local folder>, "steps")`` reads offline is what the Hub serves.
Only the files a built dataset consists of travel, by exact name (:func:`allowed_file`): the card,
``meta/info.json``, the Parquet tables, the Zarr v3 metadata and shard keys of the known arrays,
the WebDataset tars. No pickle, no ``.pt``, nothing a loader could execute. ``push`` refuses a
folder holding anything else; ``load`` skips anything else with a warning naming it; downloads
are checked against the sha256 manifest in ``meta/info.json``.
"""

from __future__ import annotations

import io
import json
import re
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from addiffusion.config import UserError
from addiffusion.datasets.store import episode_from_record
from addiffusion.datasets.validate import Problem, validate_dataset

ZARR_ARRAYS = ("image_features", "text_features", "thumbnails", "latents")
"""The arrays ``datasets build`` writes into ``features.zarr`` (see :mod:`.build`)."""
_ARRAYS = "|".join(ZARR_ARRAYS)
ALLOWED_FILES = re.compile(
    "|".join(
        (
            r"README\.md",
            r"meta/info\.json",
            r"data/(episodes|steps)/(train|heldout)-\d{5,}\.parquet",
            r"features\.zarr/zarr\.json",
            rf"features\.zarr/({_ARRAYS})/zarr\.json",
            # Zarr v3 default chunk key encoding: c/<i>/<j>/..., one shard file per key.
            rf"features\.zarr/({_ARRAYS})/c(/\d+)+",
            r"webdataset/episodes-\d{5,}\.tar",
        )
    )
)
"""Every file a built dataset may hold, by exact path (POSIX, relative to the dataset folder)."""


_COARSE_PATTERNS = (
    "README.md",
    "meta/info.json",
    "data/*.parquet",
    "features.zarr/*",
    "webdataset/*.tar",
)
"""fnmatch patterns for an offline ``snapshot_download`` (no file listing); every file they let
through is then held to :data:`ALLOWED_FILES`."""


class RefusedFiles(UserError, ValueError):
    """A dataset folder holds files outside :data:`ALLOWED_FILES`."""


def allowed_file(rel: str) -> bool:
    """Whether ``rel`` (POSIX path relative to a dataset folder) is a dataset file."""
    return ALLOWED_FILES.fullmatch(rel) is not None


def split_files(rels: list[str]) -> tuple[list[str], list[str]]:
    """(allowed, refused) relative paths, each sorted."""
    allowed = sorted(r for r in rels if allowed_file(r))
    return allowed, sorted(r for r in rels if not allowed_file(r))


def _local_files(folder: Path) -> list[str]:
    return [p.relative_to(folder).as_posix() for p in folder.rglob("*") if p.is_file()]


def _warn_skipped(where: str, refused: list[str]) -> None:
    for rel in refused:
        warnings.warn(
            f"{where}: skipping {rel}: not a dataset file (allowed: README.md, meta/info.json, "
            "data/*/<split>-NNNNN.parquet, features.zarr metadata and chunks, "
            "webdataset/episodes-NNNNN.tar)",
            stacklevel=3,
        )


class DatasetProblems(UserError, ValueError):
    def __init__(self, where: str, problems: list[Problem]) -> None:
        listing = "\n  ".join(str(p) for p in problems[:20])
        super().__init__(f"{where}: {len(problems)} problem(s):\n  {listing}")
        self.problems = problems


def push_to_hub(
    dataset_dir: Path,
    repo_id: str,
    token: str | None = None,
    private: bool = False,
    revision: str | None = None,
    commit_message: str = "Upload addiffusion trajectory dataset",
) -> str:
    """Validate ``dataset_dir`` and upload it as a Hub dataset repo; returns the commit URL."""
    from huggingface_hub import HfApi

    dataset_dir = Path(dataset_dir)
    allowed, refused = split_files(_local_files(dataset_dir))
    if refused:
        listing = ", ".join(str(dataset_dir / r) for r in refused[:10])
        raise RefusedFiles(
            f"refusing to push {dataset_dir}: {len(refused)} file(s) that are not dataset files "
            f"({listing}); remove them, or push from a fresh `addiffusion datasets build` output"
        )
    problems = validate_dataset(dataset_dir)
    if problems:
        raise DatasetProblems(f"refusing to push {dataset_dir}", problems)
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(dataset_dir),
        repo_id=repo_id,
        repo_type="dataset",
        allow_patterns=allowed,  # exact names: nothing else can slip in
        revision=revision,
        commit_message=commit_message,
    )
    return str(getattr(info, "commit_url", info))


def load(
    path_or_repo_id: str | Path, revision: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """A verified local dataset folder: ``path_or_repo_id`` itself when it is a folder, else a
    Hub dataset repo downloaded with ``snapshot_download``. Only :data:`ALLOWED_FILES` are
    downloaded and checked; any other file is skipped with a warning naming it."""
    local = Path(path_or_repo_id)
    skipped: list[str] = []
    if not local.is_dir():
        from huggingface_hub import HfApi, snapshot_download

        repo = str(path_or_repo_id)
        try:
            listed = HfApi().list_repo_files(repo, repo_type="dataset", revision=revision)
        except Exception:  # noqa: BLE001 - offline: the cached snapshot is filtered below
            listed = None
        patterns = list(_COARSE_PATTERNS)
        if listed is not None:
            # .gitattributes is the Hub's own bookkeeping, never a dataset file: no warning.
            patterns, skipped = split_files([f for f in listed if f != ".gitattributes"])
            _warn_skipped(repo, skipped)
        local = Path(
            snapshot_download(
                repo,
                repo_type="dataset",
                revision=revision,
                cache_dir=cache_dir,
                allow_patterns=patterns,
            )
        )
    _, refused = split_files(_local_files(local))
    _warn_skipped(str(path_or_repo_id), [r for r in refused if r not in skipped])
    problems = validate_dataset(local, ignore=set(refused))
    if problems:
        raise DatasetProblems(f"dataset {path_or_repo_id}", problems)
    return local


def iter_episodes(dataset_dir: Path) -> Iterator[dict[str, Any]]:
    """Stream episodes from the WebDataset tars one at a time (constant memory): dicts with
    the episode row as in Parquet (roots' ``parent_episode_id`` None, where the JSON has ``""``),
    ``steps`` (list of step rows) and ``filmstrip`` ((H, n*W, 3) uint8 or None).
    Only ``.json`` and ``.png`` members are decoded; anything else in a tar is ignored."""
    import webdataset as wds

    tars = sorted(str(p) for p in (Path(dataset_dir) / "webdataset").glob("*.tar"))
    if not tars:
        raise FileNotFoundError(
            f"{dataset_dir}/webdataset/ holds no tars (build with datasets.write_webdataset: true)"
        )
    for sample in wds.WebDataset(tars, shardshuffle=False, empty_check=False):
        if "json" not in sample:
            raise ValueError(f"{sample.get('__url__')}: sample {sample['__key__']!r} has no json")
        record = episode_from_record(json.loads(sample["json"]))
        png = sample.get("png")
        record["filmstrip"] = (
            np.asarray(Image.open(io.BytesIO(png)).convert("RGB")) if png else None
        )
        yield record
