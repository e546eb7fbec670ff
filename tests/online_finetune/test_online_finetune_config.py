"""OnlineFinetuneConfig: defaults, the params.yaml section, validation messages."""

from __future__ import annotations

from pathlib import Path

import pytest

from addiffusion.config import ConfigError, read_params
from addiffusion.online_finetune.config import OnlineFinetuneConfig


def test_defaults_match_params_yaml() -> None:
    params = read_params(Path(__file__).parents[2] / "params.yaml")
    assert OnlineFinetuneConfig.from_params(params) == OnlineFinetuneConfig()


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"n_envs": 0}, "online_finetune.n_envs must be >= 1, got 0"),
        ({"n_envs": 1, "n_steps": 1, "batch_size": 2}, "online_finetune.n_steps must be"),
        ({"batch_size": 1000}, r"online_finetune.batch_size must be in \[2, n_envs \* n_steps\]"),
        ({"gamma": 0.0}, "online_finetune.gamma must be in"),
        ({"clip_range": 1.5}, "online_finetune.clip_range must be in"),
        ({"device": "tpu"}, "online_finetune.device must be one of"),
        ({"iterations": "3"}, "online_finetune.iterations must be an integer"),
        ({"lr": 0.1}, "unknown key online_finetune.lr"),
        ({"seeds": []}, r"online_finetune.seeds must be a non-empty list, got \[\]"),
        ({"seeds": [0, 1, 0]}, "online_finetune.seeds must be a list without repeats"),
        ({"seeds": [0, -1]}, r"online_finetune.seeds\[1\] must be >= 0, got -1"),
        ({"seeds": 3}, "online_finetune.seeds must be a list"),
        ({"from_scratch": "yes"}, "online_finetune.from_scratch must be true or false"),
        ({"seed": 3}, r"online_finetune.seed: it became online_finetune.seeds.*seeds: \[3\]"),
    ],
)
def test_bad_values_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        OnlineFinetuneConfig.from_dict(data)


def test_seeds_and_from_scratch() -> None:
    cfg = OnlineFinetuneConfig()
    assert cfg.seeds == (0,) and cfg.from_scratch
    cfg = OnlineFinetuneConfig.from_dict({"seeds": [3, 1], "from_scratch": False})
    assert cfg.seeds == (3, 1) and not cfg.from_scratch
    assert OnlineFinetuneConfig(seeds=[2]).seeds == (2,)  # a list given in code: a tuple
    assert cfg.to_dict()["seeds"] == (3, 1)
