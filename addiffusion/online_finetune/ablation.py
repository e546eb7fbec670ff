"""Action-space and state ablations a policy carries from its offline run into PPO and back out.

An offline run's ``manifest.json`` may restrict its policy (the keys and their reader are
:mod:`addiffusion.offline_rl.policy`'s, the one owner of that contract):

* ``"allowed_actions": ["jump-1", "stop"]``: names of the action table's actions the policy may
  take (absent or null: all). Its masks are the legal actions ANDed with these, a row left with
  no action keeping its own mask (:func:`addiffusion.policy.combine.restrict_mask_np`).
* ``"observation_drop": ["quality"]``: parts of the observation vector
  (:data:`addiffusion.diffusion.mdp.OBSERVATION_PARTS`) the policy sees as zeros (absent: none;
  :func:`addiffusion.diffusion.mdp.drop_parts`), located by the manifest's ``"observation"``
  layout.

PPO started from such a policy trains under the same restrictions (the env's masks and
observations, :class:`~addiffusion.online_finetune.env.SamplerVectorEnv`), the from-scratch
baseline too (so the two stay comparable), and the fine-tuned actor's manifest records the same
three keys so that :class:`~addiffusion.online_finetune.ppo.FinetunedPolicy` applies them when it
acts on full observations and the sampler's masks.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np

from addiffusion.diffusion.actions import ActionTable
from addiffusion.diffusion.mdp import ObservationLayout


@dataclass(frozen=True)
class Ablation:
    """The restrictions of a policy (module docstring); the default restricts nothing."""

    allowed_actions: tuple[str, ...] | None = None
    """Names of the actions the policy may take, in table order; None: every action."""
    observation_drop: tuple[str, ...] = ()
    """Observation parts the policy sees as zeros."""
    observation: ObservationLayout | None = None
    """Where the parts live (needed when ``observation_drop`` is not empty)."""

    def __post_init__(self) -> None:
        if self.observation_drop and self.observation is None:
            raise ValueError(
                f"dropping observation parts {list(self.observation_drop)} needs the observation "
                "layout that says where their columns are"
            )

    @classmethod
    def from_manifest(cls, manifest: Mapping[str, Any], table: ActionTable, where: str) -> Ablation:
        """Read and check ``allowed_actions``, ``observation_drop`` and ``observation`` of a
        manifest (an offline run's or a fine-tuned actor's): unknown names or parts, repeats and
        a drop without a layout are refused, naming ``where``
        (:class:`~addiffusion.offline_rl.policy.PolicyLoadError`, a user error)."""
        from addiffusion.offline_rl.policy import allowed_actions, observation_drop

        data = dict(manifest)
        drop, layout = observation_drop(data, where)
        return cls(allowed_actions(data, table, where), drop, layout)

    def allowed(self, table: ActionTable) -> np.ndarray | None:
        """``(table.n,)`` bool of the allowed actions, or None when all are."""
        if self.allowed_actions is None:
            return None
        return np.array([name in self.allowed_actions for name in table.names])

    def keep(self) -> np.ndarray | None:
        """``(dim,)`` bool, False on the dropped columns; None when nothing is dropped."""
        if not self.observation_drop:
            return None
        assert self.observation is not None  # __post_init__
        return self.observation.keep_mask(self.observation_drop)

    def to_manifest(self) -> dict[str, Any]:
        """The manifest keys (``allowed_actions`` null and ``observation_drop`` [] when
        unrestricted; ``observation`` null when the layout is unknown)."""
        return {
            "allowed_actions": None if self.allowed_actions is None else list(self.allowed_actions),
            "observation_drop": list(self.observation_drop),
            "observation": None if self.observation is None else self.observation.to_dict(),
        }
