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
    ],
)
def test_bad_values_name_the_key(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        OnlineFinetuneConfig.from_dict(data)
