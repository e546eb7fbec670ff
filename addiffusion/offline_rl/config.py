"""``offline_rl`` section of ``params.yaml``: algorithms, their d3rlpy settings, seeds, ablations.

One sub-section per algorithm (``offline_rl.iql``, ``.cql``, ``.bc``, ``.bcq``) is handed as it
is to that algorithm's d3rlpy config (:data:`ALGORITHMS`): its keys are the d3rlpy config's own
field names (``weight_temp``, ``expectile``, ``alpha``, ``action_flexibility``, ...), checked
against that dataclass when the params are read. What the pipeline sets itself (the encoders from
``hidden_units``, the observation scaler) is not a key there. A new d3rlpy algorithm needs one
entry in :data:`ALGORITHMS` and one field below.
"""

from __future__ import annotations

import dataclasses
import importlib
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar, Literal

from addiffusion.config import ConfigError, StageConfig, check
from addiffusion.diffusion.actions import ACTION_SPACES
from addiffusion.diffusion.mdp import OBSERVATION_PARTS


@dataclass(frozen=True)
class Algorithm:
    """One offline algorithm: its d3rlpy config class and how its policy is stored."""

    config: str
    """``module:ClassName`` of the d3rlpy config (imported only when used)."""
    d3rlpy_type: str
    """The type name d3rlpy stores in the ``.d3`` file (``config.get_type()``)."""
    has_q: bool
    """It learns a Q function (FQE-style validation metrics apply; BC has none)."""

    def config_class(self) -> type:
        module, name = self.config.split(":")
        return getattr(importlib.import_module(module), name)


ALGORITHMS: dict[str, Algorithm] = {
    "iql": Algorithm("addiffusion.offline_rl.discrete_iql:DiscreteIQLConfig", "discrete_iql", True),
    "cql": Algorithm("d3rlpy.algos:DiscreteCQLConfig", "discrete_cql", True),
    "bc": Algorithm("d3rlpy.algos:DiscreteBCConfig", "discrete_bc", False),
    "bcq": Algorithm("d3rlpy.algos:DiscreteBCQConfig", "discrete_bcq", True),
}
"""Our algorithm names -> their d3rlpy config. The single table of algorithms."""

PIPELINE_KEYS = ("observation_scaler", "action_scaler", "reward_scaler")
"""d3rlpy config fields the pipeline sets (with the ``*_factory`` fields): never params keys."""


def algo_settings(name: str, values: dict[str, Any], prefix: str) -> dict[str, Any]:
    """``values`` checked against the d3rlpy config of algorithm ``name``: every key must be a
    scalar field of that dataclass (int, float, bool or str) with a value of its type. Returns
    the values with numbers coerced to the field's type."""
    cls = ALGORITHMS[name].config_class()
    fields = {
        f.name: f.default
        for f in dataclasses.fields(cls)
        if f.init
        and f.name not in PIPELINE_KEYS
        and isinstance(f.default, bool | int | float | str)
    }
    out: dict[str, Any] = {}
    for key, value in values.items():
        where = f"{prefix}.{key}"
        if key not in fields:
            owned = key in PIPELINE_KEYS or key.endswith("_factory")
            raise ConfigError(
                f"{where} is set by the pipeline (offline_rl.hidden_units, "
                "offline_rl.observation_scaler), not a params key"
                if owned
                else f"unknown key {where}: {cls.__name__} has no scalar field {key!r} "
                f"(known: {', '.join(sorted(fields))})"
            )
        default = fields[key]
        if isinstance(default, bool):
            check(isinstance(value, bool), where, "true or false", value)
        elif isinstance(default, int):
            check(
                isinstance(value, int) and not isinstance(value, bool), where, "an integer", value
            )
        elif isinstance(default, float):
            ok = isinstance(value, int | float) and not isinstance(value, bool)
            check(ok and math.isfinite(value), where, "a finite number", value)
            value = float(value)
        else:
            check(isinstance(value, str), where, "a string", value)
        out[key] = value
    return out


RANGES: dict[str, tuple[Any, str]] = {
    "batch_size": (lambda v: v >= 1, ">= 1"),
    "n_critics": (lambda v: v >= 1, ">= 1"),
    "target_update_interval": (lambda v: v >= 1, ">= 1"),
    "gamma": (lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    "tau": (lambda v: 0.0 < v <= 1.0, "in (0, 1]"),
    "expectile": (lambda v: 0.0 < v < 1.0, "in (0, 1)"),
    "action_flexibility": (lambda v: 0.0 < v < 1.0, "in (0, 1)"),
    "learning_rate": (lambda v: v > 0.0, "> 0"),
    "actor_learning_rate": (lambda v: v > 0.0, "> 0"),
    "critic_learning_rate": (lambda v: v > 0.0, "> 0"),
    "weight_temp": (lambda v: v >= 0.0, ">= 0"),
    "max_weight": (lambda v: v > 0.0, "> 0"),
    "alpha": (lambda v: v >= 0.0, ">= 0"),
    "beta": (lambda v: v >= 0.0, ">= 0"),
}
"""Range checks of d3rlpy config fields, by field name, whichever algorithm has them."""


def _iql() -> dict[str, Any]:
    return {
        "batch_size": 256,
        "gamma": 0.99,
        "expectile": 0.7,
        "weight_temp": 10.0,
        "max_weight": 100.0,
        "tau": 0.005,
        "n_critics": 2,
        "actor_learning_rate": 3e-4,
        "critic_learning_rate": 3e-4,
    }


def _cql() -> dict[str, Any]:
    return {
        "batch_size": 256,
        "gamma": 0.99,
        "learning_rate": 3e-4,
        "n_critics": 2,
        "target_update_interval": 1000,
        "alpha": 1.0,
    }


def _bc() -> dict[str, Any]:
    return {"batch_size": 256, "learning_rate": 3e-4, "beta": 0.5}


def _bcq() -> dict[str, Any]:
    return {
        "batch_size": 256,
        "gamma": 0.99,
        "learning_rate": 3e-4,
        "n_critics": 2,
        "target_update_interval": 1000,
        "action_flexibility": 0.3,
        "beta": 0.5,
    }


DEFAULTS = {"iql": _iql, "cql": _cql, "bc": _bc, "bcq": _bcq}
"""The pipeline's settings of each algorithm; a params section overrides them key by key."""


@dataclass(frozen=True)
class FQEParams:
    """Fitted Q Evaluation (d3rlpy ``DiscreteFQE``) of every policy and checkpoint, on the
    validation split, written by the offline_rl stage next to each policy (``ope.json``)."""

    n_steps: int = 1000
    """Gradient steps of each FQE fit (0: no FQE)."""
    batch_size: int = 256
    learning_rate: float = 1e-3
    target_update_interval: int = 100


@dataclass(frozen=True)
class OfflineRLConfig(StageConfig):
    """Train a jump / stop / refine policy offline from the converted trajectory dataset."""

    section: ClassVar[str] = "offline_rl"

    algo: str = "iql"
    """The main algorithm: a key of :data:`ALGORITHMS` (iql, cql, bc, bcq)."""
    baselines: list[str] = field(default_factory=list)
    """Algorithms also trained on the same data, written under ``<out>/baselines/<name>/``."""
    seeds: list[int] = field(default_factory=lambda: [0])
    """One run per seed: the first writes ``<out>/``, each other ``<out>/seeds/<seed>/``."""
    n_steps: int = 5000
    """Gradient steps."""
    n_steps_per_epoch: int = 1000
    """Steps between logger commits, validation metrics and checkpoints."""
    hidden_units: list[int] = field(default_factory=lambda: [128, 128])
    """Hidden layer widths of every MLP (policy, Q, V, imitator); ReLU after each."""
    observation_scaler: Literal["standard", "none"] = "standard"
    """Standardise observations with the training set's mean and std (stored in the .d3)."""
    action_space: Literal["stop_only", "jumps", "jumps_refine"] = "jumps_refine"
    """Ablation: the actions the policy may take (``ActionTable.allowed``). Transitions of other
    actions are cut from the training data and the policy's mask excludes them."""
    drop_observations: list[Literal["image_features", "text_features", "time", "quality"]] = field(
        default_factory=list
    )
    """Ablation: observation parts the policy is trained and run without (seen as zeros)."""
    fqe: FQEParams = field(default_factory=FQEParams)
    iql: dict[str, Any] = field(default_factory=_iql)
    """d3rlpy DiscreteIQLConfig fields (ours: addiffusion.offline_rl.discrete_iql)."""
    cql: dict[str, Any] = field(default_factory=_cql)
    """d3rlpy DiscreteCQLConfig fields."""
    bc: dict[str, Any] = field(default_factory=_bc)
    """d3rlpy DiscreteBCConfig fields."""
    bcq: dict[str, Any] = field(default_factory=_bcq)
    """d3rlpy DiscreteBCQConfig fields."""
    device: str = "auto"
    """auto (cuda:0 if available, else cpu), cpu, cuda or cuda:N."""

    def __post_init__(self) -> None:
        s = self.section
        assert set(ACTION_SPACES) == {"stop_only", "jumps", "jumps_refine"}
        assert set(OBSERVATION_PARTS) == {"image_features", "text_features", "time", "quality"}
        names = ", ".join(ALGORITHMS)
        check(self.algo in ALGORITHMS, f"{s}.algo", f"one of {names}", self.algo)
        for i, name in enumerate(self.baselines):
            check(name in ALGORITHMS, f"{s}.baselines[{i}]", f"one of {names}", name)
        for name in ("n_steps", "n_steps_per_epoch"):
            value = getattr(self, name)
            check(value >= 1, f"{s}.{name}", ">= 1", value)
        check(
            self.n_steps >= self.n_steps_per_epoch,
            f"{s}.n_steps",
            f">= {s}.n_steps_per_epoch ({self.n_steps_per_epoch})",
            self.n_steps,
        )
        check(len(self.hidden_units) >= 1, f"{s}.hidden_units", "a non-empty list", [])
        for i, h in enumerate(self.hidden_units):
            check(h >= 1, f"{s}.hidden_units[{i}]", ">= 1", h)
        check(len(self.seeds) >= 1, f"{s}.seeds", "a non-empty list", self.seeds)
        check(
            len(set(self.seeds)) == len(self.seeds),
            f"{s}.seeds",
            "a list without repeats",
            self.seeds,
        )
        for i, seed in enumerate(self.seeds):
            check(seed >= 0, f"{s}.seeds[{i}]", ">= 0", seed)
        check(
            len(set(self.drop_observations)) == len(self.drop_observations)
            and len(self.drop_observations) < len(OBSERVATION_PARTS),
            f"{s}.drop_observations",
            "a list of distinct parts that keeps at least one",
            self.drop_observations,
        )
        f = self.fqe
        check(f.n_steps >= 0, f"{s}.fqe.n_steps", ">= 0", f.n_steps)
        for name in ("batch_size", "target_update_interval"):
            check(getattr(f, name) >= 1, f"{s}.fqe.{name}", ">= 1", getattr(f, name))
        check(f.learning_rate > 0.0, f"{s}.fqe.learning_rate", "> 0", f.learning_rate)
        check(
            len(set(self.baselines)) == len(self.baselines),
            f"{s}.baselines",
            "a list without repeats",
            self.baselines,
        )
        check(
            self.algo not in self.baselines,
            f"{s}.baselines",
            f"a list without the main algo {self.algo!r}",
            self.baselines,
        )
        check(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            f"{s}.device",
            "auto, cpu, cuda or cuda:N",
            self.device,
        )
        for name in ALGORITHMS:
            # Validated (and numbers coerced) once, here: train hands them to d3rlpy as they are.
            # Keys a section leaves out keep the pipeline's defaults (not d3rlpy's).
            given = {**DEFAULTS[name](), **getattr(self, name)}
            values = algo_settings(name, given, f"{s}.{name}")
            object.__setattr__(self, name, values)
            for key, value in values.items():
                if key in RANGES:
                    ok, expected = RANGES[key]
                    check(ok(value), f"{s}.{name}.{key}", expected, value)

    def settings(self, algo: str) -> dict[str, Any]:
        """The d3rlpy config fields of ``algo`` (its params sub-section)."""
        return dict(getattr(self, algo))

    def gamma(self, algo: str) -> float:
        """The discount ``algo`` trains with (d3rlpy's default 0.99 where its section has none)."""
        return float(self.settings(algo).get("gamma", 0.99))

    def with_algo(self, algo: str) -> OfflineRLConfig:
        """The same settings with ``algo`` as the main algorithm (used for the baselines)."""
        return dataclasses.replace(self, algo=algo, baselines=[])

    def with_seed(self, seed: int) -> OfflineRLConfig:
        """The same settings for one seed (``seeds == [seed]``)."""
        return dataclasses.replace(self, seeds=[seed])

    @property
    def seed(self) -> int:
        """The run's seed: the first of ``seeds``."""
        return self.seeds[0]
