"""A tiny synthetic store written with the real ShardWriter, and its built dataset.

3 shards (4 roots each), 6 prompts x 2 seeds, n_max=5, warm-up 1, every third prompt heldout;
roots follow the stride patterns of `addiffusion.datasets.synthetic` and those visiting step 2
branch there (refine or another jump), then continue with jump-1.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
import torch

from addiffusion.datasets.build import build_dataset
from addiffusion.datasets.config import DatasetsConfig
from addiffusion.datasets.synthetic import write_synthetic_store

BRANCH_STEP = 2
N_MAX = 5


@pytest.fixture(scope="session")
def store_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("store")
    write_synthetic_store(root, branch_step=BRANCH_STEP, n_max=N_MAX)
    return root


@pytest.fixture()
def store(store_master: Path, tmp_path: Path) -> Path:
    """A private copy tests may corrupt."""
    return Path(shutil.copytree(store_master, tmp_path / "store"))


@pytest.fixture(scope="session")
def dataset(store_master: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Built once; tests must not modify it."""
    out = tmp_path_factory.mktemp("built") / "dataset"
    return build_dataset(store_master, out, DatasetsConfig(chunk_rows=20, val_fraction=0.25))
