"""The action table: the one definition of the MDP's actions.

Decision points sit on a fine grid of the solver's timesteps (``n_max`` points, grid index ``i``;
the denoiser has been evaluated at ``t_i`` and x̂0_i exists). The actions, in id order:

* ``jump-s`` for each stride ``s`` of the configured set: one solver step from ``t_i`` to
  ``t_{min(i+s, n_max-1)}`` and a denoiser evaluation there (1 NFE). ``jump-1`` is the old
  *continue*; a stride past the grid's end lands on its last point.
* ``stop``: decode x̂0_i; the episode ends (0 NFE).
* ``refine``: ``k`` re-denoise iterations on the under-generation mask at ``t_i``, then a solver
  step to ``t_{i+1}`` and the evaluation there (``k + 1`` NFE).
* ``reuse`` (only in tables built with ``reuse=True``): a solver step to ``t_{i+1}`` that keeps
  the denoiser output of the last evaluated point instead of evaluating at ``t_{i+1}`` (0 NFE):
  the skip of AdaptiveDiffusion-style training-free rules.

Every fixed k-step schedule with ``k | n_max`` is a path: ``jump-(n_max/k)`` from point 0 until
point ``n_max - n_max/k``, then ``stop``. Legality (:meth:`ActionTable.mask`): jumps and refine
need a next point (not at the last one); stop, refine and reuse are illegal during warm-up
(``i < warmup``), except that the last point allows only stop; refine needs budget left.

The table is recorded in every shard and dataset (``info["actions"]``); consumers rebuild it with
:meth:`ActionTable.from_dict` and never hard-code ids or the count.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

ActionKind = Literal["jump", "stop", "refine", "reuse"]
KINDS: tuple[str, ...] = ("jump", "stop", "refine", "reuse")
ACTION_SPACES: tuple[str, ...] = ("stop_only", "jumps", "jumps_refine")
"""Action-space ablations (:meth:`ActionTable.allowed`)."""


@dataclass(frozen=True)
class Action:
    """One row of the table."""

    id: int
    name: str
    kind: ActionKind
    stride: int
    """Grid points advanced (jump: its stride; refine, reuse: 1; stop: 0)."""
    nfe: int
    """Denoiser evaluations the action costs (jump 1, refine k + 1, stop 0, reuse 0)."""


@dataclass(frozen=True)
class ActionTable:
    """The actions and their legality rules on an ``n_max``-point grid."""

    actions: tuple[Action, ...]
    n_max: int
    warmup: int
    refine_budget: int

    @classmethod
    def build(
        cls,
        strides: Sequence[int],
        n_max: int,
        warmup: int,
        refine_budget: int,
        refine_k: int,
        reuse: bool = False,
    ) -> ActionTable:
        strides = list(strides)
        if not strides or 1 not in strides:
            raise ValueError(f"the jump strides must include 1, got {strides}")
        if any(s < 1 for s in strides) or len(set(strides)) != len(strides):
            raise ValueError(f"the jump strides must be distinct integers >= 1, got {strides}")
        rows = [Action(j, f"jump-{s}", "jump", s, 1) for j, s in enumerate(sorted(strides))]
        rows.append(Action(len(rows), "stop", "stop", 0, 0))
        rows.append(Action(len(rows), "refine", "refine", 1, refine_k + 1))
        if reuse:
            rows.append(Action(len(rows), "reuse", "reuse", 1, 0))
        return cls(tuple(rows), int(n_max), int(warmup), int(refine_budget))

    # Derived views: the count, names, ids and per-action arrays all come from the rows.
    @property
    def n(self) -> int:
        return len(self.actions)

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(a.name for a in self.actions)

    def id(self, name: str) -> int:
        for a in self.actions:
            if a.name == name:
                return a.id
        raise KeyError(f"no action {name!r} in the table (actions: {list(self.names)})")

    @property
    def stop(self) -> int:
        return self.id("stop")

    @property
    def refine(self) -> int:
        return self.id("refine")

    @property
    def reuse(self) -> int:
        """Id of ``reuse`` (KeyError when the table has none: see :attr:`has_reuse`)."""
        return self.id("reuse")

    @property
    def has_reuse(self) -> bool:
        return "reuse" in self.kinds

    @property
    def jumps(self) -> tuple[int, ...]:
        return tuple(a.id for a in self.actions if a.kind == "jump")

    @property
    def strides(self) -> tuple[int, ...]:
        return tuple(a.stride for a in self.actions if a.kind == "jump")

    def jump(self, stride: int) -> int:
        return self.id(f"jump-{stride}")

    @property
    def nfe_cost(self) -> np.ndarray:
        return np.array([a.nfe for a in self.actions], np.int64)

    @property
    def kinds(self) -> tuple[ActionKind, ...]:
        return tuple(a.kind for a in self.actions)

    def target(self, step: np.ndarray | int, action: np.ndarray | int) -> np.ndarray:
        """Grid index reached by ``action`` from ``step`` (stop: the same point)."""
        stride = np.array([a.stride for a in self.actions])[np.asarray(action)]
        return np.minimum(np.asarray(step) + stride, self.n_max - 1)

    def mask(
        self,
        step: np.ndarray | int,
        refines_used: np.ndarray | int = 0,
        refine_budget: int | None = None,
    ) -> np.ndarray:
        """Legal actions at grid index ``step``: ``(..., n)`` bool. ``refine_budget`` overrides
        the table's (a sampler without cross-attention passes 0)."""
        step = np.asarray(step)
        used = np.broadcast_to(np.asarray(refines_used), step.shape)
        budget = self.refine_budget if refine_budget is None else refine_budget
        last = step >= self.n_max - 1
        warm = (step < self.warmup) & ~last
        mask = np.zeros(step.shape + (self.n,), dtype=bool)
        for a in self.actions:
            if a.kind == "jump":
                mask[..., a.id] = ~last
            elif a.kind == "stop":
                mask[..., a.id] = ~warm
            elif a.kind == "reuse":
                mask[..., a.id] = ~last & ~warm
            else:
                mask[..., a.id] = ~last & ~warm & (used < budget)
        return mask

    def allowed(self, space: str) -> np.ndarray:
        """``(n,)`` bool: the actions of an action-space ablation (:data:`ACTION_SPACES`).

        ``stop_only``: jump-1 and stop (the base schedule with a learned stop); ``jumps``: every
        jump and stop; ``jumps_refine``: every action. A policy restricted to a space is trained
        on transitions of those actions only and never takes another (its mask is ANDed with
        this)."""
        kinds = {
            "stop_only": None,
            "jumps": ("jump", "stop"),
            "jumps_refine": KINDS,
        }
        if space not in kinds:
            raise ValueError(
                f"unknown action space {space!r}; expected one of {', '.join(ACTION_SPACES)}"
            )
        if space == "stop_only":
            return np.array([a.name in ("jump-1", "stop") for a in self.actions])
        return np.array([a.kind in kinds[space] for a in self.actions])

    def to_dict(self) -> dict[str, Any]:
        return {
            "n_max": self.n_max,
            "warmup": self.warmup,
            "refine_budget": self.refine_budget,
            "actions": [
                {"id": a.id, "name": a.name, "kind": a.kind, "stride": a.stride, "nfe": a.nfe}
                for a in self.actions
            ],
        }

    @classmethod
    def from_dict(cls, data: Any, where: str = "info['actions']") -> ActionTable:
        """Strict reader of :meth:`to_dict`'s output; errors name ``where`` and the field."""
        if not isinstance(data, dict):
            raise ValueError(f"{where} must be an object, got {type(data).__name__}")
        for key in ("n_max", "warmup", "refine_budget", "actions"):
            if key not in data:
                raise ValueError(f"{where} has no {key!r} (keys: {sorted(data)})")
        rows = []
        for j, row in enumerate(data["actions"]):
            try:
                a = Action(
                    int(row["id"]),
                    str(row["name"]),
                    row["kind"],
                    int(row["stride"]),
                    int(row["nfe"]),
                )
            except (KeyError, TypeError, ValueError) as e:
                raise ValueError(f"{where}.actions[{j}] is malformed ({e!r}): {row!r}") from e
            if a.id != j or a.kind not in KINDS:
                raise ValueError(
                    f"{where}.actions[{j}] must have id {j} and kind {'|'.join(KINDS)}, got {row!r}"
                )
            rows.append(a)
        table = cls(
            tuple(rows), int(data["n_max"]), int(data["warmup"]), int(data["refine_budget"])
        )
        kinds = table.kinds
        if (
            kinds.count("stop") != 1
            or kinds.count("refine") != 1
            or kinds.count("reuse") > 1
            or 1 not in table.strides
        ):
            raise ValueError(
                f"{where} needs exactly one stop, one refine, at most one reuse and a jump-1, "
                f"got {list(table.names)}"
            )
        return table
