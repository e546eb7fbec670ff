"""Share built datasets on the Hugging Face Hub, load them back, stream their episodes.

The folder uploaded *is* the built dataset folder (its README.md carries the Hub ``configs``), so
what ``datasets.load_dataset(<local folder>, "steps")`` reads offline is what the Hub serves.
Downloads fetch only data formats that cannot execute code (Parquet, Zarr chunks, JSON, tar, PNG)
— never pickles — and are checked against the sha256 manifest in ``meta/info.json``.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from addiffusion.datasets.store import episode_from_record
from addiffusion.datasets.validate import Problem, validate_dataset

ALLOW_PATTERNS = ["README.md", "*.json", "*.parquet", "*.tar", "*.png", "features.zarr/*"]
"""Files a dataset consists of (fnmatch; ``*`` spans folders). No pickle-based format."""


class DatasetProblems(ValueError):
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
    problems = validate_dataset(dataset_dir)
    if problems:
        raise DatasetProblems(f"refusing to push {dataset_dir}", problems)
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="dataset", private=private, exist_ok=True)
    info = api.upload_folder(
        folder_path=str(dataset_dir),
        repo_id=repo_id,
        repo_type="dataset",
        allow_patterns=ALLOW_PATTERNS,
        revision=revision,
        commit_message=commit_message,
    )
    return str(getattr(info, "commit_url", info))


def load(
    path_or_repo_id: str | Path, revision: str | None = None, cache_dir: str | Path | None = None
) -> Path:
    """A verified local dataset folder: ``path_or_repo_id`` itself when it is a folder, else a
    Hub dataset repo downloaded with ``snapshot_download`` (data formats only)."""
    local = Path(path_or_repo_id)
    if not local.is_dir():
        from huggingface_hub import snapshot_download

        local = Path(
            snapshot_download(
                str(path_or_repo_id),
                repo_type="dataset",
                revision=revision,
                cache_dir=cache_dir,
                allow_patterns=ALLOW_PATTERNS,
            )
        )
    problems = validate_dataset(local)
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
