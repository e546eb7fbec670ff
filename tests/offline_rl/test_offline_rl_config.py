import dataclasses

import pytest
from d3rlpy.algos import DiscreteBCQConfig, DiscreteCQLConfig

from addiffusion.config import ConfigError, read_params
from addiffusion.offline_rl.config import ALGORITHMS, OfflineRLConfig
from addiffusion.offline_rl.train import make_algo


def test_defaults_and_params_section() -> None:
    cfg = OfflineRLConfig.from_params({"offline_rl": {"algo": "cql", "hidden_units": [8, 8]}})
    assert cfg.algo == "cql" and cfg.hidden_units == [8, 8]
    assert OfflineRLConfig.from_params({}).algo == "iql"
    assert OfflineRLConfig.from_params({}).seeds == [0]


def test_the_repo_params_name_every_algorithm() -> None:
    cfg = OfflineRLConfig.from_params(read_params("params.yaml"))
    assert set(ALGORITHMS) == {cfg.algo, *cfg.baselines}
    assert cfg.iql["weight_temp"] == 10.0 and cfg.bcq["action_flexibility"] == 0.3


@pytest.mark.parametrize(
    ("section", "message"),
    [
        ({"algo": "sac"}, "offline_rl.algo must be one of iql, cql, bc, bcq, got 'sac'"),
        ({"baselines": ["sac"]}, "offline_rl.baselines[0] must be one of iql, cql, bc, bcq"),
        ({"n_steps": 0}, "offline_rl.n_steps must be >= 1, got 0"),
        ({"n_steps": 10, "n_steps_per_epoch": 20}, "offline_rl.n_steps must be >= "),
        ({"iql": {"expectile": 1.0}}, "offline_rl.iql.expectile must be in (0, 1), got 1.0"),
        ({"bcq": {"action_flexibility": 0}}, "offline_rl.bcq.action_flexibility must be in (0, 1)"),
        ({"iql": {"beta": 3.0}}, "unknown key offline_rl.iql.beta: DiscreteIQLConfig has no"),
        (
            {"cql": {"encoder_factory": "x"}},
            "offline_rl.cql.encoder_factory is set by the pipeline",
        ),
        ({"bc": {"observation_scaler": "x"}}, "offline_rl.bc.observation_scaler is set by the"),
        ({"cql": {"gamma": "high"}}, "offline_rl.cql.gamma must be a finite number, got 'high'"),
        ({"cql": {"n_critics": 1.5}}, "offline_rl.cql.n_critics must be an integer, got 1.5"),
        ({"iql": []}, "offline_rl.iql must be a mapping"),
        ({"hidden_units": []}, "offline_rl.hidden_units must be a non-empty list"),
        ({"hidden_units": [8, 0]}, "offline_rl.hidden_units[1] must be >= 1, got 0"),
        ({"baselines": ["iql"]}, "offline_rl.baselines must be a list without the main algo"),
        ({"baselines": ["cql", "cql"]}, "offline_rl.baselines must be a list without repeats"),
        ({"seeds": []}, "offline_rl.seeds must be a non-empty list"),
        ({"seeds": [1, 1]}, "offline_rl.seeds must be a list without repeats"),
        ({"seeds": [-1]}, "offline_rl.seeds[0] must be >= 0, got -1"),
        ({"action_space": "all"}, "offline_rl.action_space must be one of"),
        ({"drop_observations": ["colour"]}, "offline_rl.drop_observations[0] must be one of"),
        ({"fqe": {"n_steps": -1}}, "offline_rl.fqe.n_steps must be >= 0, got -1"),
        ({"device": "tpu"}, "offline_rl.device must be auto, cpu, cuda or cuda:N, got 'tpu'"),
        ({"lr": 0.1}, "unknown key offline_rl.lr"),
    ],
)
def test_bad_values_name_the_key(section: dict, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        OfflineRLConfig.from_dict(section)
    assert message in str(e.value)


def test_with_algo_and_seed_keep_settings() -> None:
    cfg = OfflineRLConfig(algo="iql", baselines=["cql", "bc"], cql={"alpha": 2.0}, seeds=[3, 4])
    bc = cfg.with_algo("bc").with_seed(4)
    assert bc.algo == "bc" and bc.baselines == [] and bc.cql["alpha"] == 2.0
    assert bc.seeds == [4] and bc.seed == 4


@pytest.mark.parametrize("algo", sorted(ALGORITHMS))
def test_sections_go_to_d3rlpy_as_they_are(algo: str) -> None:
    """Every key of the algorithm's section reaches its d3rlpy config unchanged; the encoders
    come from hidden_units."""
    cfg = OfflineRLConfig(hidden_units=[8], device="cpu")
    built = make_algo(cfg, algo, None).config
    assert built.get_type() == ALGORITHMS[algo].d3rlpy_type
    for key, value in cfg.settings(algo).items():
        assert getattr(built, key) == value
    encoders = [f.name for f in dataclasses.fields(built) if f.name.endswith("encoder_factory")]
    assert encoders and all(getattr(built, e).hidden_units == [8] for e in encoders)


def test_a_value_changes_only_its_algorithm() -> None:
    cfg = OfflineRLConfig.from_dict({"cql": {"alpha": 4.0}, "bcq": {"action_flexibility": 0.1}})
    assert isinstance(make_algo(cfg, "cql", None).config, DiscreteCQLConfig)
    assert make_algo(cfg, "cql", None).config.alpha == 4.0
    assert make_algo(cfg, "bcq", None).config.action_flexibility == 0.1
    assert isinstance(make_algo(cfg, "bcq", None).config, DiscreteBCQConfig)
    # Keys a section leaves out keep the pipeline's defaults, not d3rlpy's (batch 32, ...).
    assert cfg.settings("cql") == {**OfflineRLConfig().settings("cql"), "alpha": 4.0}
