"""Online fine-tuning: a gymnasium vector env over the stepwise sampler, MaskablePPO from the IQL
actor, and the fine-tuned actor's files (safetensors + hashed manifest).

Importing this package registers the single-episode env ``addiffusion/Sampler-v0``
(:class:`SamplerEnv`) with gymnasium, by entry-point string (nothing heavy is imported until
``gymnasium.make("addiffusion/Sampler-v0", dataset=..., device=..., rewards=..., prompts=...)``).

Public API (imported lazily, so ``addiffusion --help`` does not import SB3 or diffusers):
``OnlineFinetuneConfig`` (``.config``), ``SamplerVectorEnv`` (``.env``), ``SamplerEnv``,
``make_sampler_env`` (``.single_env``), ``Sb3VecEnv`` (``.sb3_adapter``), ``finetune``
(``.finetune``), ``load_offline_networks``, ``load_offline_actor``, ``check_action_table``
(``.offline_init``), ``load_finetuned_policy``, ``FinetunedPolicy``, ``build_maskable_ppo``
(``.ppo``), ``MlpActor``, ``ActorSpec``, ``mlp_actor_from_module`` (``.actor``),
``train_prompts``, ``load_dataset_mdp`` (``.dataset_mdp``), ``Ablation`` (``.ablation``: the
allowed actions and dropped observation parts a policy carries from offline RL into PPO). The
dataset's task and its sampler are :mod:`addiffusion.task`'s (``read_task``, ``task_sampler``).
"""

from __future__ import annotations

import importlib
from typing import Any

from gymnasium.envs.registration import register, registry

ENV_ID = "addiffusion/Sampler-v0"
"""gymnasium id of :class:`SamplerEnv` (one episode per reset, on a built dataset's MDP)."""

if ENV_ID not in registry:  # a module reload must not re-register (gymnasium warns)
    register(id=ENV_ID, entry_point=f"{__name__}.single_env:make_sampler_env")

_EXPORTS = {
    "OnlineFinetuneConfig": "config",
    "SamplerVectorEnv": "env",
    "SamplerEnv": "single_env",
    "make_sampler_env": "single_env",
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
    "load_dataset_mdp": "dataset_mdp",
    "Ablation": "ablation",
}
__all__ = ["ENV_ID", *_EXPORTS]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{_EXPORTS[name]}"), name)
