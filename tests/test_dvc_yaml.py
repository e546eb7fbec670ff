"""dvc.yaml lists every params key a stage reads, so that DVC re-runs exactly what a params change
affects (a reward weight re-runs relabel and later, never collect or build). A stage lists a key
either by name (``rewards.c_nfe``) or through a whole section or sub-section it reads entirely
(``offline_rl``: every algorithm's d3rlpy settings, ``offline_rl.iql.weight_temp`` included), or
a stage whose outputs it depends on lists it (eval's baseline keys: eval_baselines re-runs on
them, and eval on its new outputs)."""

from __future__ import annotations

import dataclasses
import importlib
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
PARAMS = yaml.safe_load((REPO / "params.yaml").read_text())


def _params(stage: str) -> set[str]:
    return set(STAGES[stage].get("params", []))


def _outs(stage: str) -> set[str]:
    return {next(iter(o)) if isinstance(o, dict) else o for o in STAGES[stage].get("outs", [])}


def _inside(a: str, b: str) -> bool:
    """Path ``a`` is ``b`` or inside it."""
    return a == b or a.startswith(b.rstrip("/") + "/")


def _feeding(stage: str) -> set[str]:
    """The stages one of whose outputs ``stage`` depends on."""
    deps = STAGES[stage].get("deps", [])
    return {
        other
        for other in STAGES
        if other != stage
        and any(_inside(d, o) or _inside(o, d) for d in deps for o in _outs(other))
    }


def _lists(stage: str, key: str) -> bool:
    """``stage`` or a stage feeding it lists ``key`` (dotted): the key or a section above it."""
    parts = key.split(".")
    listed = _params(stage).union(*(_params(s) for s in _feeding(stage)))
    return any(".".join(parts[:i]) in listed for i in range(1, len(parts) + 1))


def _missing(stage: str, keys: set[str]) -> list[str]:
    return sorted(k for k in keys if not _lists(stage, k))


def _configs() -> dict[str, type[StageConfig]]:
    """Every stage config of the package, by section (each config module imported here, so the
    result does not depend on what other tests imported)."""
    package = Path(importlib.import_module("addiffusion").__file__).parent
    for path in sorted(package.rglob("config.py")):
        importlib.import_module(".".join(path.relative_to(package.parent).with_suffix("").parts))
    subclasses = StageConfig.__subclasses__()
    return {c.section: c for c in subclasses if c.__module__.startswith("addiffusion.")}


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
    assert not _missing(stage, keys), f"{stage} misses {_missing(stage, keys)}"


def test_offline_rl_lists_every_algorithm_setting() -> None:
    """Each algorithm's sub-section is handed to d3rlpy as it is: every key of it (and of the
    FQE settings) is a param of the stage, e.g. ``dvc exp run -S offline_rl.iql.weight_temp=3``
    re-runs offline_rl."""
    section = PARAMS["offline_rl"]
    keys = {
        f"offline_rl.{sub}.{key}"
        for sub in ("iql", "cql", "bc", "bcq", "fqe")
        for key in section[sub]
    }
    assert len(keys) > 20
    assert not _missing("offline_rl", keys), _missing("offline_rl", keys)


@pytest.mark.parametrize(
    ("stage", "keys"),
    [
        # eval loads the policies params name (algo, baselines, each seed's run) and the online
        # runs of each seed (addiffusion/eval/cli.py).
        (
            "eval",
            {
                "offline_rl.algo",
                "offline_rl.baselines",
                "offline_rl.seeds",
                "online_finetune.seeds",
                "rewards.weights",
                "rewards.normalize",
            },
        ),
    ],
)
def test_stage_lists_the_keys_of_other_sections_it_reads(stage: str, keys: set[str]) -> None:
    assert not _missing(stage, keys), f"{stage} misses {_missing(stage, keys)}"


def test_listed_params_exist() -> None:
    """No stage lists a key that is not in params.yaml or not a field of its section's config
    (a renamed key left behind: ``online_finetune.seed`` after it became ``seeds``)."""
    configs = _configs()
    for stage, spec in STAGES.items():
        for key in spec.get("params", []):
            section, *rest = key.split(".")
            assert section in PARAMS, f"{stage} lists {key}, whose section is not in params.yaml"
            value = PARAMS[section]
            for part in rest:
                assert isinstance(value, dict) and part in value, (
                    f"{stage} lists {key}, which params.yaml does not have"
                )
                value = value[part]
            if rest and section in configs:
                fields = {f.name for f in dataclasses.fields(configs[section])}
                assert rest[0] in fields, f"{stage} lists {key}: not a {section} setting"


def test_reward_keys_do_not_touch_collection() -> None:
    for stage in ("collect", "build"):
        assert not any(p.startswith("rewards") for p in _params(stage))
