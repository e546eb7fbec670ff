"""The generated dataset card as the Hub's own client parses it."""

from __future__ import annotations

from pathlib import Path

import pytest
from huggingface_hub import DatasetCard, DatasetCardData

from addiffusion.config import ConfigError
from addiffusion.datasets.build import build_dataset
from addiffusion.datasets.config import DatasetsConfig
from addiffusion.datasets.validate import validate

HUB_CONFIGS = ["episodes", "steps"]


def _card(dataset: Path) -> DatasetCardData:
    card = DatasetCard.load(dataset / "README.md")
    assert isinstance(card.data, DatasetCardData)
    data = card.data.to_dict()
    # The Hub's rule for custom licenses: "other" needs license_name and license_link.
    if data["license"] == "other":
        assert data.get("license_name") and data.get("license_link"), data
    assert [c["config_name"] for c in data["configs"]] == HUB_CONFIGS
    return card.data


def test_default_card_declares_an_unknown_license(dataset: Path) -> None:
    data = _card(dataset)
    assert data.license == "unknown"
    assert "license_name" not in data.to_dict() and "license_link" not in data.to_dict()
    assert "set `datasets.license`" in (dataset / "README.md").read_text()


def test_custom_license_reaches_the_card(store_master: Path, tmp_path: Path) -> None:
    cfg = DatasetsConfig.from_dict(
        {
            "license": "other",
            "license_name": "shapes-world-1.0",
            "license_link": "https://example.org/shapes-world-license",
        }
    )
    out = build_dataset(store_master, tmp_path / "dataset", cfg)
    assert validate(out) == []
    data = _card(out)
    assert (data.license, data.license_name, data.license_link) == (
        "other",
        "shapes-world-1.0",
        "https://example.org/shapes-world-license",
    )
    assert (
        "[shapes-world-1.0](https://example.org/shapes-world-license)"
        in (out / "README.md").read_text()
    )


def test_hub_license_id_reaches_the_card(store_master: Path, tmp_path: Path) -> None:
    out = build_dataset(store_master, tmp_path / "dataset", DatasetsConfig(license="cc-by-4.0"))
    assert _card(out).license == "cc-by-4.0"


@pytest.mark.parametrize(
    ("params", "message"),
    [
        ({"license": "other"}, "datasets.license_name must be the license's id"),
        (
            {"license": "other", "license_name": "x-1.0", "license_link": "LICENSE"},
            "datasets.license_link must be the URL of the license text",
        ),
        ({"license": "CC-BY-4.0"}, "datasets.license must be a Hub license id"),
        ({"license": "mit", "license_name": "mit"}, "datasets.license_name must be empty"),
    ],
)
def test_bad_license_settings_fail_at_load(params: dict, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        DatasetsConfig.from_dict(params)
