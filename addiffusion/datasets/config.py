"""``datasets`` section of ``params.yaml``: how ``datasets build`` lays out a dataset."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from addiffusion.config import StageConfig, check


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

    def __post_init__(self) -> None:
        check(
            0.0 <= self.val_fraction < 1.0, "datasets.val_fraction", "in [0, 1)", self.val_fraction
        )
        check(self.chunk_rows >= 1, "datasets.chunk_rows", ">= 1", self.chunk_rows)
        check(self.zarr_chunk_rows >= 1, "datasets.zarr_chunk_rows", ">= 1", self.zarr_chunk_rows)
        check(
            self.zarr_shard_rows >= self.zarr_chunk_rows
            and self.zarr_shard_rows % self.zarr_chunk_rows == 0,
            "datasets.zarr_shard_rows",
            f"a multiple of datasets.zarr_chunk_rows ({self.zarr_chunk_rows})",
            self.zarr_shard_rows,
        )
