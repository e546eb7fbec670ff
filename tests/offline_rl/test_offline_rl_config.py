import pytest

from addiffusion.config import ConfigError
from addiffusion.offline_rl.config import OfflineRLConfig


def test_defaults_and_params_section() -> None:
    cfg = OfflineRLConfig.from_params({"offline_rl": {"algo": "cql", "hidden_units": [8, 8]}})
    assert cfg.algo == "cql" and cfg.hidden_units == [8, 8]
    assert OfflineRLConfig.from_params({}).algo == "iql"


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"algo": "sac"}, "offline_rl.algo must be one of 'iql', 'cql', 'bc', got 'sac'"),
        ({"n_steps": 0}, "offline_rl.n_steps must be >= 1, got 0"),
        ({"n_steps": 10, "n_steps_per_epoch": 20}, "offline_rl.n_steps must be >= "),
        ({"expectile": 1.0}, "offline_rl.expectile must be in (0, 1), got 1.0"),
        ({"hidden_units": []}, "offline_rl.hidden_units must be a non-empty list"),
        ({"hidden_units": [8, 0]}, "offline_rl.hidden_units[1] must be >= 1, got 0"),
        ({"baselines": ["iql"]}, "offline_rl.baselines must be a list without the main algo"),
        ({"baselines": ["cql", "cql"]}, "offline_rl.baselines must be a list without repeats"),
        ({"device": "tpu"}, "offline_rl.device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        ({"gamma": "high"}, "offline_rl.gamma must be a number, got 'high'"),
        ({"lr": 0.1}, "unknown key offline_rl.lr"),
    ],
)
def test_bad_values_name_the_key(section: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        OfflineRLConfig.from_dict(section)
    assert message in str(e.value)


def test_with_algo_keeps_settings() -> None:
    cfg = OfflineRLConfig(algo="iql", baselines=["cql", "bc"], batch_size=7)
    bc = cfg.with_algo("bc")
    assert bc.algo == "bc" and bc.baselines == [] and bc.batch_size == 7
