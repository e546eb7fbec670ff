"""dvc.yaml lists every params key a stage reads, key by key, so that DVC re-runs exactly what a
params change affects (a reward weight re-runs relabel and later, never collect or build)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from addiffusion.collect.config import CollectConfig
from addiffusion.config import StageConfig
from addiffusion.datasets.config import DatasetsConfig
from addiffusion.eval.config import EvalConfig
from addiffusion.offline_rl.config import OfflineRLConfig
from addiffusion.online_finetune.config import OnlineFinetuneConfig
from addiffusion.rewards.config import RewardConfig

REPO = Path(__file__).resolve().parents[1]
STAGES = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]


def _params(stage: str) -> set[str]:
    return set(STAGES[stage].get("params", []))


@pytest.mark.parametrize(
    ("stage", "config"),
    [
        ("collect", CollectConfig),
        ("build", DatasetsConfig),
        ("relabel", RewardConfig),
        ("offline_rl", OfflineRLConfig),
        ("online_finetune", OnlineFinetuneConfig),
        ("online_finetune", RewardConfig),
        ("eval", EvalConfig),
    ],
)
def test_stage_lists_every_key_of_its_config(stage: str, config: type[StageConfig]) -> None:
    keys = {f"{config.section}.{f.name}" for f in dataclasses.fields(config)}
    assert keys <= _params(stage), f"{stage} misses {sorted(keys - _params(stage))}"


def test_reward_keys_do_not_touch_collection() -> None:
    for stage in ("collect", "build"):
        assert not any(p.startswith("rewards.") for p in _params(stage))
