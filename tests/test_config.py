"""Typed params: unknown keys and bad values fail at load time, before anything is written."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from addiffusion.cli import main
from addiffusion.collect.config import CollectConfig
from addiffusion.config import ConfigError, read_params
from addiffusion.rewards.config import RewardConfig

REPO = Path(__file__).resolve().parents[1]


def test_repo_params_load() -> None:
    params = read_params(REPO / "params.yaml")
    cfg = CollectConfig.from_params(params)
    assert cfg.n_max >= 1
    assert RewardConfig.from_params(params).weights


def test_unknown_key_names_key_and_known_keys() -> None:
    with pytest.raises(
        ConfigError, match=r"unknown key collect\.n_maxx .*known keys of collect: .*n_max"
    ):
        CollectConfig.from_dict({"n_maxx": 3})


def test_range_message_names_key_expected_and_got() -> None:
    with pytest.raises(ConfigError, match=r"^collect\.n_max must be >= 1, got 0$"):
        CollectConfig.from_dict({"n_max": 0})


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"n_max": "12"}, r"collect\.n_max must be an integer, got '12'"),
        ({"n_max": True}, r"collect\.n_max must be an integer, got True"),
        ({"guidance_scale": "high"}, r"collect\.guidance_scale must be a number"),
        ({"device": "tpu"}, r"collect\.device must be one of 'auto', 'cpu', 'cuda', got 'tpu'"),
        ({"scheduler": "pndm"}, r"collect\.scheduler must be one of ddim, dpmsolver\+\+"),
        ({"height": 30}, r"collect\.height must be a positive multiple of 8, got 30"),
    ],
)
def test_bad_values(data: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        CollectConfig.from_dict(data)


def test_nested_mapping_types() -> None:
    with pytest.raises(
        ConfigError, match=r"rewards\.weights\.clip_score must be a number, got 'x'"
    ):
        RewardConfig.from_dict({"weights": {"clip_score": "x"}})
    assert RewardConfig.from_dict({"weights": {"clip_score": 2}}).weights == {"clip_score": 2.0}


def test_section_must_be_mapping() -> None:
    with pytest.raises(ConfigError, match="collect must be a mapping"):
        CollectConfig.from_params({"collect": [1, 2]})


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        ({"n_max": 0}, "collect.n_max must be >= 1, got 0"),
        ({"bogus": 1}, "unknown key collect.bogus"),
        ({"grid": "karras"}, "collect.grid must be one of uniform, ays, custom, got 'karras'"),
        ({"grid": "custom"}, "collect.timesteps must be a list exactly when grid is custom"),
        (
            {"grid": "custom", "timesteps": [999, 500]},
            "collect.timesteps must be n_max = 16 strictly decreasing training timesteps",
        ),
    ],
)
def test_cli_fails_before_writing(
    tmp_path: Path, capsys: pytest.CaptureFixture, edit: dict, message: str
) -> None:
    params = read_params(REPO / "params.yaml")
    params["collect"].update(edit)
    bad = tmp_path / "params.yaml"
    bad.write_text(yaml.safe_dump(params))
    store = tmp_path / "store"
    assert main(["collect", "--store", str(store), "--params", str(bad), "--quiet"]) == 2
    assert message in capsys.readouterr().err
    assert not store.exists()
