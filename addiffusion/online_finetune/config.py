"""``online_finetune`` section of ``params.yaml``: a short MaskablePPO run from the IQL actor."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar, Literal

from addiffusion.config import ConfigError, StageConfig, check


@dataclass(frozen=True)
class OnlineFinetuneConfig(StageConfig):
    """PPO fine-tuning on the sampler MDP the dataset was collected on.

    One iteration = ``n_envs * n_steps`` environment steps (one denoising decision each) followed
    by ``n_epochs`` passes of minibatch PPO updates (sb3-contrib ``MaskablePPO``). Each seed of
    ``seeds`` is one such run from the offline actor, plus one from scratch (``from_scratch``).
    """

    section: ClassVar[str] = "online_finetune"

    n_envs: int = 8
    """Sub-environments = episodes denoised side by side (one batch element each)."""
    n_steps: int = 8
    """Rollout length per sub-environment per iteration (decisions, not episodes)."""
    iterations: int = 8
    """PPO iterations (rollout + update). Short on purpose: tens at most."""
    learning_rate: float = 1e-4
    """Adam step size; small, so the policy stays close to the IQL actor it starts from."""
    batch_size: int = 32
    """Minibatch size of the PPO update; must divide into ``n_envs * n_steps`` at least once."""
    n_epochs: int = 4
    """Passes over each rollout."""
    gamma: float = 1.0
    """Discount. Episodes are short (< n_max decisions, fewer with long jumps) and the reward
    telescopes, so 1.0
    keeps the return equal to the offline definition (Q_stop - Q_0 - c_nfe * NFE + bonus)."""
    gae_lambda: float = 0.95
    clip_range: float = 0.2
    """PPO ratio clip epsilon."""
    ent_coef: float = 0.0
    """Entropy bonus coefficient."""
    init_critic: bool = True
    """Start the PPO value network from the offline run's state-value network V (IQL has one,
    same MLP shape) instead of a fresh init; advantages are then informative from iteration 1.
    IQL's V is an upper expectile over the data's actions, so it starts optimistic."""
    seeds: tuple[int, ...] = (0,)
    """One run per seed (each seeds torch, numpy, the prompt order and the episodes' noise
    seeds). ``seeds[0]`` writes ``<out>/``, each further seed ``s`` writes ``<out>/seeds/<s>/``;
    seed ``s`` starts from ``<offline>/seeds/<s>/`` when that folder exists, else ``<offline>/``."""
    from_scratch: bool = True
    """Also train, per seed, a PPO with the same architecture, hyperparameters, seed and number of
    environment steps but a fresh random init (actor and critic; the offline run's observation
    standardisation) into ``<run>/scratch/``: does the offline init add anything?"""
    device: Literal["auto", "cpu", "cuda"] = "auto"
    """Where the sampler (diffusion backbone, scorer) and the PPO networks run."""

    def __post_init__(self) -> None:
        p = self.section
        object.__setattr__(self, "seeds", tuple(self.seeds))  # a list given in code: hashable
        check(self.n_envs >= 1, f"{p}.n_envs", ">= 1", self.n_envs)
        # SB3 needs >= 2 samples per rollout to normalise advantages.
        check(
            self.n_steps >= 1 and self.n_steps * self.n_envs >= 2,
            f"{p}.n_steps",
            f">= 1 with n_steps * n_envs >= 2 (n_envs = {self.n_envs})",
            self.n_steps,
        )
        check(self.iterations >= 1, f"{p}.iterations", ">= 1", self.iterations)
        check(self.learning_rate > 0, f"{p}.learning_rate", "> 0", self.learning_rate)
        check(
            2 <= self.batch_size <= self.n_envs * self.n_steps,
            f"{p}.batch_size",
            f"in [2, n_envs * n_steps] = [2, {self.n_envs * self.n_steps}]",
            self.batch_size,
        )
        check(self.n_epochs >= 1, f"{p}.n_epochs", ">= 1", self.n_epochs)
        check(0.0 < self.gamma <= 1.0, f"{p}.gamma", "in (0, 1]", self.gamma)
        check(0.0 <= self.gae_lambda <= 1.0, f"{p}.gae_lambda", "in [0, 1]", self.gae_lambda)
        check(0.0 < self.clip_range < 1.0, f"{p}.clip_range", "in (0, 1)", self.clip_range)
        check(self.ent_coef >= 0.0, f"{p}.ent_coef", ">= 0", self.ent_coef)
        check(len(self.seeds) >= 1, f"{p}.seeds", "a non-empty list", list(self.seeds))
        check(
            len(set(self.seeds)) == len(self.seeds),
            f"{p}.seeds",
            "a list without repeats",
            list(self.seeds),
        )
        for i, seed in enumerate(self.seeds):
            check(seed >= 0, f"{p}.seeds[{i}]", ">= 0", seed)

    @classmethod
    def from_dict(cls, data: dict[str, Any] | None) -> OnlineFinetuneConfig:
        if data and "seed" in data:  # renamed: say to what, not just "unknown key"
            raise ConfigError(
                f"unknown key {cls.section}.seed: it became {cls.section}.seeds, a list "
                f"(seeds: [{data['seed']}] is the old seed: {data['seed']})"
            )
        return super().from_dict(data)

    @property
    def steps_per_iteration(self) -> int:
        return self.n_envs * self.n_steps
