"""``datasets`` section of ``params.yaml``: how ``datasets build`` lays out a dataset."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import ClassVar

from addiffusion.config import StageConfig, check

LICENSE_ID = re.compile(r"[a-z0-9][a-z0-9.+-]*")
"""The form of Hub license ids (``cc-by-4.0``, ``openrail++``) and of ``license_name``."""


@dataclass(frozen=True)
class DatasetsConfig(StageConfig):
    """Layout of a built dataset. None of these keys changes a reward: rewards come from
    ``datasets relabel`` (``rewards`` section), so a reward ablation never rebuilds."""

    section: ClassVar[str] = "datasets"

    val_fraction: float = 0.2
    """Fraction of the *train* prompts whose episodes form the offline-RL validation split
    (episodes column ``rl_split``); split by prompt so validation prompts are unseen."""
    split_seed: int = 0
    """Seed of the prompt permutation that picks the validation prompts."""
    chunk_rows: int = 250_000
    """Rows per Parquet file under ``data/episodes`` and ``data/steps`` (Hub-friendly sizes)."""
    zarr_chunk_rows: int = 1024
    """Rows per Zarr chunk of ``features.zarr`` arrays (the unit of a random read)."""
    zarr_shard_rows: int = 65536
    """Rows per Zarr shard file (a multiple of ``zarr_chunk_rows``; keeps file counts low)."""
    write_webdataset: bool = True
    """Also write ``webdataset/*.tar`` (one sample per episode: JSON + thumbnail filmstrip)."""
    include_thumbnails: bool = True
    """Copy x̂0 thumbnails into ``features.zarr`` when every shard has them."""
    include_latents: bool = False
    """Copy x̂0 latents (float16, large) into ``features.zarr`` when every shard has them."""
    license: str = "unknown"
    """License of the built dataset for its Hub card: a Hub license id
    (https://huggingface.co/docs/hub/repositories-licenses, e.g. ``cc-by-4.0``), ``unknown`` until
    you declare one, or ``other`` with ``license_name`` and ``license_link``. The trajectories hold
    the backbone's outputs on the collected prompts, so their terms bound what you may declare."""
    license_name: str = ""
    """With ``license: other``: the license's id, lowercase with dashes (``my-license-1.0``)."""
    license_link: str = ""
    """With ``license: other``: the URL of the license text."""

    def __post_init__(self) -> None:
        check(
            0.0 <= self.val_fraction < 1.0, "datasets.val_fraction", "in [0, 1)", self.val_fraction
        )
        check(self.split_seed >= 0, "datasets.split_seed", ">= 0", self.split_seed)
        check(self.chunk_rows >= 1, "datasets.chunk_rows", ">= 1", self.chunk_rows)
        check(self.zarr_chunk_rows >= 1, "datasets.zarr_chunk_rows", ">= 1", self.zarr_chunk_rows)
        check(
            self.zarr_shard_rows >= self.zarr_chunk_rows
            and self.zarr_shard_rows % self.zarr_chunk_rows == 0,
            "datasets.zarr_shard_rows",
            f"a multiple of datasets.zarr_chunk_rows ({self.zarr_chunk_rows})",
            self.zarr_shard_rows,
        )
        check(
            LICENSE_ID.fullmatch(self.license) is not None,
            "datasets.license",
            "a Hub license id (lowercase, e.g. cc-by-4.0, unknown or other)",
            self.license,
        )
        if self.license == "other":
            check(
                LICENSE_ID.fullmatch(self.license_name) is not None,
                "datasets.license_name",
                "the license's id, lowercase with dashes (e.g. my-license-1.0), with "
                "datasets.license: other",
                self.license_name,
            )
            check(
                self.license_link.startswith(("https://", "http://")),
                "datasets.license_link",
                "the URL of the license text (https://...), with datasets.license: other",
                self.license_link,
            )
        else:
            for key in ("license_name", "license_link"):
                check(
                    not getattr(self, key),
                    f"datasets.{key}",
                    f"empty unless datasets.license is other (it is {self.license!r})",
                    getattr(self, key),
                )
