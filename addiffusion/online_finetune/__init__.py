"""Online fine-tuning: a gymnasium vector env over the stepwise sampler, MaskablePPO from the IQL
actor, and the fine-tuned actor's files (safetensors + hashed manifest).

Public API (imported lazily, so ``addiffusion --help`` does not import SB3 or diffusers):
``OnlineFinetuneConfig`` (``.config``), ``SamplerVectorEnv`` (``.env``), ``Sb3VecEnv``
(``.sb3_adapter``), ``finetune`` (``.finetune``), ``load_offline_networks``,
``load_offline_actor``, ``check_action_table`` (``.offline_init``), ``load_finetuned_policy``,
``FinetunedPolicy``, ``build_maskable_ppo`` (``.ppo``), ``MlpActor``, ``ActorSpec``,
``mlp_actor_from_module`` (``.actor``), ``train_prompts`` (``.dataset_mdp``). The dataset's task
and its sampler are :mod:`addiffusion.task`'s (``read_task``, ``task_sampler``).
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "OnlineFinetuneConfig": "config",
    "SamplerVectorEnv": "env",
    "Sb3VecEnv": "sb3_adapter",
    "finetune": "finetune",
    "load_offline_actor": "offline_init",
    "load_offline_networks": "offline_init",
    "load_finetuned_policy": "ppo",
    "FinetunedPolicy": "ppo",
    "build_maskable_ppo": "ppo",
    "MlpActor": "actor",
    "ActorSpec": "actor",
    "mlp_actor_from_module": "actor",
    "check_action_table": "offline_init",
    "train_prompts": "dataset_mdp",
}
__all__ = list(_EXPORTS)


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
