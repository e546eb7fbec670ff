"""Reading the MDP (models, sampler settings, stats, train prompts) back from a built dataset."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
from online_finetune_consts import N_MAX, PROMPTS, STATS, WARMUP

from addiffusion.online_finetune.dataset_mdp import read_dataset_mdp


def test_reads_the_dataset_mdp(tiny_dataset: Path) -> None:
    mdp = read_dataset_mdp(tiny_dataset)
    assert mdp.scheduler == "ddim" and mdp.components == ("clip_score", "stability")
    assert (mdp.settings.n_max, mdp.settings.warmup, mdp.settings.height) == (N_MAX, WARMUP, 32)
    assert mdp.component_stats == STATS and mdp.obs_dim == 85
    # train split only, distinct, in prompt-id order
    assert mdp.train_prompts == (PROMPTS[0], PROMPTS[1], PROMPTS[2])


def test_bad_datasets_are_named(tiny_dataset: Path, tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a built dataset"):
        read_dataset_mdp(tmp_path)
    bad = tmp_path / "bad"
    shutil.copytree(tiny_dataset, bad)
    info = json.loads((bad / "meta" / "info.json").read_text())
    info["sampler"]["teleport"] = 1
    (bad / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(ValueError, match="sampler setting 'teleport' is unknown"):
        read_dataset_mdp(bad)
    del info["sampler"]
    (bad / "meta" / "info.json").write_text(json.dumps(info))
    with pytest.raises(KeyError, match="no 'sampler' entry"):
        read_dataset_mdp(bad)
