"""What online fine-tuning reads from a built dataset: its task (addiffusion.task) and train
prompts; the dataset's action table is the one the live sampler builds."""

from __future__ import annotations

from pathlib import Path

import pytest
from online_finetune_consts import N_MAX, PROMPTS, STATS, STRIDES, WARMUP

from addiffusion.online_finetune.dataset_mdp import train_prompts
from addiffusion.task import read_task


def test_task_and_train_prompts(tiny_dataset: Path, sampler) -> None:
    task = read_task(tiny_dataset)
    assert task.scheduler == "ddim" and task.components == ("clip_score", "stability")
    assert (task.settings.n_max, task.settings.warmup, task.settings.height) == (N_MAX, WARMUP, 32)
    assert task.settings.strides == STRIDES
    assert task.component_stats == STATS and task.obs_dim == 85
    assert task.actions == sampler.table  # the env's MDP is the dataset's
    # train split only, distinct, in prompt-id order
    assert train_prompts(tiny_dataset) == (PROMPTS[0], PROMPTS[1], PROMPTS[2])


def test_not_a_dataset_is_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="not a built dataset"):
        train_prompts(tmp_path)
