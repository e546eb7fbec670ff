"""``offline_rl`` section of ``params.yaml``: which algorithm, its hyperparameters, baselines."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar, Literal

from addiffusion.config import StageConfig, check

Algo = Literal["iql", "cql", "bc"]


@dataclass(frozen=True)
class OfflineRLConfig(StageConfig):
    """Train a stop / continue / refine policy offline from the converted trajectory dataset."""

    section: ClassVar[str] = "offline_rl"

    algo: Algo = "iql"
    """iql (our DiscreteIQL), cql (d3rlpy DiscreteCQL) or bc (d3rlpy DiscreteBC)."""
    baselines: list[Algo] = field(default_factory=list)
    """Algorithms also trained on the same data, written under ``<out>/baselines/<name>/``."""
    n_steps: int = 5000
    """Gradient steps."""
    n_steps_per_epoch: int = 1000
    """Steps between logger commits and validation evaluations."""
    batch_size: int = 256
    gamma: float = 0.99
    expectile: float = 0.7
    """IQL: expectile tau of the value loss, in (0, 1); 0.5 is SARSA-like, near 1 a max."""
    beta: float = 10.0
    """IQL: inverse temperature of the advantage weights exp(beta * A). Higher than the paper's 3:
    near the best stop step the advantages are of the order of c_nfe (a few hundredths)."""
    max_weight: float = 100.0
    """IQL: clamp of the advantage weights."""
    tau: float = 0.005
    """IQL: Polyak coefficient of the target Q networks."""
    n_critics: int = 2
    """Q networks in the ensemble (IQL and CQL); the min is used in targets."""
    actor_learning_rate: float = 3e-4
    """IQL policy and BC learning rate."""
    critic_learning_rate: float = 3e-4
    """IQL Q/V and CQL learning rate."""
    hidden_units: list[int] = field(default_factory=lambda: [128, 128])
    """Hidden layer widths of every MLP (policy, Q, V); ReLU after each."""
    cql_alpha: float = 1.0
    """CQL: weight of the conservative term."""
    cql_target_update_interval: int = 1000
    """CQL: gradient steps between hard target-network syncs."""
    bc_beta: float = 0.5
    """BC: L2 penalty on the logits (d3rlpy DiscreteBC's beta)."""
    observation_scaler: Literal["standard", "none"] = "standard"
    """Standardise observations with the training set's mean and std (stored in the .d3)."""
    seed: int = 0
    device: str = "auto"
    """auto (cuda:0 if available, else cpu), cpu, cuda or cuda:N."""

    def __post_init__(self) -> None:
        s = self.section
        for name in ("n_steps", "n_steps_per_epoch", "batch_size", "n_critics"):
            value = getattr(self, name)
            check(value >= 1, f"{s}.{name}", ">= 1", value)
        check(
            self.n_steps >= self.n_steps_per_epoch,
            f"{s}.n_steps",
            f">= {s}.n_steps_per_epoch ({self.n_steps_per_epoch})",
            self.n_steps,
        )
        check(0.0 < self.gamma <= 1.0, f"{s}.gamma", "in (0, 1]", self.gamma)
        check(0.0 < self.expectile < 1.0, f"{s}.expectile", "in (0, 1)", self.expectile)
        check(self.beta >= 0.0, f"{s}.beta", ">= 0", self.beta)
        check(self.max_weight > 0.0, f"{s}.max_weight", "> 0", self.max_weight)
        check(0.0 < self.tau <= 1.0, f"{s}.tau", "in (0, 1]", self.tau)
        for name in ("actor_learning_rate", "critic_learning_rate"):
            value = getattr(self, name)
            check(value > 0.0, f"{s}.{name}", "> 0", value)
        check(len(self.hidden_units) >= 1, f"{s}.hidden_units", "a non-empty list", [])
        for i, h in enumerate(self.hidden_units):
            check(h >= 1, f"{s}.hidden_units[{i}]", ">= 1", h)
        check(self.cql_alpha >= 0.0, f"{s}.cql_alpha", ">= 0", self.cql_alpha)
        check(
            self.cql_target_update_interval >= 1,
            f"{s}.cql_target_update_interval",
            ">= 1",
            self.cql_target_update_interval,
        )
        check(self.bc_beta >= 0.0, f"{s}.bc_beta", ">= 0", self.bc_beta)
        check(self.seed >= 0, f"{s}.seed", ">= 0", self.seed)
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

    def with_algo(self, algo: Algo) -> OfflineRLConfig:
        """The same settings for another algorithm (used for the baselines)."""
        data = self.to_dict()
        data.update(algo=algo, baselines=[])
        return OfflineRLConfig(**data)
