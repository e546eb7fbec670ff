"""``backbone`` section of ``params.yaml``: the built-in random models."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from addiffusion.config import StageConfig, check


@dataclass(frozen=True)
class BackboneConfig(StageConfig):
    section: ClassVar[str] = "backbone"

    tiny_seed: int = 0
    """Seed of the randomly initialised built-in ``tiny`` pipeline and tiny CLIP scorer."""

    def __post_init__(self) -> None:
        check(self.tiny_seed >= 0, "backbone.tiny_seed", ">= 0", self.tiny_seed)
