"""The strict reader of a dataset's sampler settings (addiffusion.task)."""

from __future__ import annotations

import pytest

from addiffusion.task import sampler_settings


def test_custom_grid_round_trips_from_json_lists() -> None:
    s = sampler_settings(
        {"n_max": 3, "grid": "custom", "timesteps": [999, 500, 20], "strides": [1, 2]}, "info"
    )
    assert s.grid == "custom" and s.timesteps == (999, 500, 20) and s.strides == (1, 2)
    # Datasets written before base grids existed read as the uniform grid.
    assert sampler_settings({"n_max": 3}, "info").grid == "uniform"


@pytest.mark.parametrize(
    ("data", "message"),
    [
        ({"n_max": 3, "grid": "karras"}, "grid must be one of uniform, ays, custom"),
        ({"n_max": 3, "grid": "custom"}, "timesteps must be given exactly when grid is 'custom'"),
        ({"n_max": 3, "grid": "custom", "timesteps": [999, 1]}, "2 timesteps but n_max is 3"),
        ({"n_max": 3, "spacing": "x"}, "sampler setting 'spacing' is unknown"),
    ],
)
def test_bad_settings_name_the_file(data: dict, message: str) -> None:
    with pytest.raises(ValueError, match=r"^data/meta/info\.json 'sampler'.*" + message):
        sampler_settings(data, "data/meta/info.json 'sampler'")
