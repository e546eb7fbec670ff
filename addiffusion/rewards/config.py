"""``rewards`` section of ``params.yaml``: how raw reward components combine into a reward."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import ClassVar

from addiffusion.config import StageConfig, check


@dataclass(frozen=True)
class RewardConfig(StageConfig):
    """Reward = weighted deltas of (normalised) quality components − ``c_nfe`` per NFE, plus
    ``terminal_bonus`` × quality of the final image on stop."""

    section: ClassVar[str] = "rewards"

    weights: dict[str, float] = field(default_factory=lambda: {"clip_score": 1.0, "stability": 0.0})
    """Weight per raw component (a column of the ``steps`` table, e.g. clip_score, stability,
    verifier). Components absent from a dataset are an error at relabel time."""
    c_nfe: float = 0.01
    """Penalty per denoiser evaluation (NFE), in units of (normalised) quality."""
    terminal_bonus: float = 1.0
    """Multiplier of the final image's quality, paid on stop."""
    normalize: bool = True
    """Standardise each component with the dataset's recorded mean/std before weighting."""

    def __post_init__(self) -> None:
        # Checked here too (not only at load): a NaN weight would turn every reward into NaN.
        check(len(self.weights) > 0, "rewards.weights", "a non-empty mapping", self.weights)
        for name, w in self.weights.items():
            check(math.isfinite(w), f"rewards.weights.{name}", "a finite number", w)
        check(
            math.isfinite(self.c_nfe) and self.c_nfe >= 0,
            "rewards.c_nfe",
            "a finite number >= 0",
            self.c_nfe,
        )
        check(
            math.isfinite(self.terminal_bonus) and self.terminal_bonus >= 0,
            "rewards.terminal_bonus",
            "a finite number >= 0",
            self.terminal_bonus,
        )
