"""Offline RL: discrete IQL as a d3rlpy algorithm, CQL/BC/BCQ baselines, checkpoints with FQE, safe loading.

Public API (imported lazily, so ``addiffusion --help`` does not pay for importing d3rlpy):
``DiscreteIQL``, ``DiscreteIQLConfig`` (``.discrete_iql``), ``OfflineRLConfig`` (``.config``),
``train_offline`` (``.train``), ``load_policy``, ``OfflinePolicy``, ``actor_logits_module``,
``scores_module`` (``.policy``), ``export_onnx`` (``.onnx_export``: an ONNX graph of a trained
policy, as d3rlpy's ``save_policy(".onnx")`` fails under our torch). ``import addiffusion`` (so also this package) registers ``discrete_iql`` with
d3rlpy as soon as d3rlpy is imported, so ``d3rlpy.load_learnable`` can rebuild its checkpoints;
for files you did not just write, use :func:`load_policy`, which checks the sha256 first.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DiscreteIQL": "discrete_iql",
    "DiscreteIQLConfig": "discrete_iql",
    "OfflineRLConfig": "config",
    "train_offline": "train",
    "load_policy": "policy",
    "OfflinePolicy": "policy",
    "PolicyLoadError": "policy",
    "actor_logits_module": "policy",
    "scores_module": "policy",
    "export_onnx": "onnx_export",
    "evaluate_stops": "stop_eval",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
