"""The networks PPO starts from: the actor (and V) of an ``offline_rl`` run as plain MLPs.

``policy.d3`` is unpickled by ``offline_rl.load_policy`` only when its hash is one the pipeline
recorded (dvc.lock or the trust store: ``offline_rl.trust``) and matches the run's
``manifest.json``. ``actor_logits_module`` folds d3rlpy's observation standardisation into the
first layer; it is unfolded here (``W = W' * s``, ``b = b' + W' m``) so that PPO keeps optimising
on standardised inputs, as IQL did, and its critic sees them too. Both copies are checked against
the loaded d3rlpy modules before use.

The offline run must have been trained on the dataset's action table: its manifest's
``actions`` (``ActionTable.to_dict()``) must equal the table given, and the actor's head must have
``table.n`` outputs (:func:`check_action_table`).

A run restricted by an ablation (manifest ``allowed_actions`` / ``observation_drop``:
:mod:`addiffusion.online_finetune.ablation`) is read into :attr:`OfflineNetworks.ablation`. The
copies take full observations (the actor's first layer ignores the dropped columns, as
``actor_logits_module`` makes it; the V copy does not): whoever feeds them zeroes the dropped
columns (the env does, for PPO), as the offline policy does to its own inputs, and the copies are
checked on such zeroed probes.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from addiffusion.diffusion.actions import ActionTable
from addiffusion.diffusion.mdp import drop_parts
from addiffusion.online_finetune.ablation import Ablation
from addiffusion.online_finetune.actor import MlpActor, mlp_actor_from_module


@dataclass(frozen=True)
class OfflineNetworks:
    actor: MlpActor
    """obs (B, D) -> logits (B, table.n): the IQL (or BC) policy."""
    critic: MlpActor | None
    """obs (B, D) -> V(s) (B, 1): IQL's state-value network; None for BC (it has none)."""
    manifest: dict[str, Any] = field(default_factory=dict)
    """The offline run's manifest.json (checked: its sha256 matched the policy)."""
    ablation: Ablation = field(default_factory=Ablation)
    """The run's allowed actions and dropped observation parts (none by default)."""


def _unfold_first_layer(mlp: nn.Sequential, mean: torch.Tensor, scale: torch.Tensor) -> None:
    first = mlp[0]
    if not isinstance(first, nn.Linear):
        raise ValueError(f"expected the actor to start with a Linear layer, got {first!r}")
    with torch.no_grad():
        first.bias.copy_(first.bias + first.weight @ mean)
        first.weight.copy_(first.weight * scale.view(1, -1))


def _check(name: str, ours: torch.Tensor, theirs: torch.Tensor, where: Path) -> None:
    err = float((ours - theirs).abs().max())
    if not err <= 1e-3 * max(1.0, float(theirs.abs().max())):
        raise RuntimeError(f"the {name} copied from {where} differs from it by {err:.3g}")


def check_action_table(manifest: dict, table: ActionTable, where: Path) -> None:
    """Refuse an offline run whose actions are not ``table``'s.

    ``manifest["actions"]`` (the run's action table) must equal ``table``; a manifest without it
    (written before runs recorded their table) is accepted only when its ``action_size`` is
    ``table.n``.
    """
    recorded = manifest.get("actions")
    if recorded is not None:
        theirs = ActionTable.from_dict(recorded, f"{where} 'actions'")
        if theirs != table:
            raise ValueError(
                f"{where} was trained on another action table than the dataset's: actions "
                f"{list(theirs.names)} (n_max {theirs.n_max}, warmup {theirs.warmup}, refine "
                f"budget {theirs.refine_budget}, nfe {theirs.nfe_cost.tolist()}) vs the dataset's "
                f"{list(table.names)} (n_max {table.n_max}, warmup {table.warmup}, refine budget "
                f"{table.refine_budget}, nfe {table.nfe_cost.tolist()}); retrain offline on this "
                "dataset"
            )
    size = manifest.get("action_size")
    if size is not None and int(size) != table.n:
        raise ValueError(
            f"{where} records action_size {size}, but the dataset's action table has {table.n} "
            f"actions ({list(table.names)}); retrain offline on this dataset"
        )


def load_offline_networks(offline_dir: Path, table: ActionTable | None = None) -> OfflineNetworks:
    """Load ``offline_dir/policy.d3`` (trusted and hash-checked: ``load_policy``) and copy its
    actor and V network.

    ``table``: the dataset's action table; the run's recorded table and the actor's head width
    must match it (:func:`check_action_table`). ``None`` skips the check (and then the run's own
    recorded table checks its ``allowed_actions``).
    """
    from addiffusion.offline_rl.policy import actor_logits_module, load_policy

    offline_dir = Path(offline_dir)
    manifest_path = offline_dir / "manifest.json"
    policy = load_policy(offline_dir / "policy.d3", manifest_path, device="cpu:0")
    if table is not None:
        check_action_table(policy.manifest, table, manifest_path)
    own_table = table or ActionTable.from_dict(policy.manifest["actions"], str(manifest_path))
    ablation = Ablation.from_manifest(policy.manifest, own_table, str(manifest_path))
    scaler = policy.algo.observation_scaler
    dim = policy.observation_dim
    if scaler is None:
        mean, scale = None, None
        probe = np.random.default_rng(0).standard_normal((8, dim))
    else:
        mean = torch.as_tensor(np.asarray(scaler.mean), dtype=torch.float32).reshape(-1)
        scale = torch.as_tensor(np.asarray(scaler.std), dtype=torch.float32).reshape(-1)
        scale = scale + float(scaler.eps)  # d3rlpy: (x - mean) / (std + eps)
        # probe observations near the data, where the copies must agree
        probe = mean.numpy() + np.random.default_rng(0).standard_normal((8, dim)) * scale.numpy()
    if ablation.observation is not None:  # what the policy sees of them
        probe = drop_parts(probe, ablation.observation, ablation.observation_drop)
    probe_t = torch.as_tensor(probe, dtype=torch.float32)

    mlp = actor_logits_module(policy)
    if mean is not None and scale is not None:
        _unfold_first_layer(mlp, mean, scale)
    actor = mlp_actor_from_module(mlp, mean, scale)
    if table is not None and actor.spec.n_actions != table.n:
        raise ValueError(
            f"the actor in {offline_dir} has {actor.spec.n_actions} logits, but the dataset's "
            f"action table has {table.n} actions ({list(table.names)})"
        )
    with torch.no_grad():  # as log-probabilities: d3rlpy's Categorical may normalise its logits
        _check(
            "actor",
            torch.log_softmax(actor(probe_t), -1),
            torch.log_softmax(torch.from_numpy(policy.scores(probe_t.numpy())), -1),
            offline_dir,
        )

    impl = policy.algo.impl
    value_func = getattr(impl.modules, "value_func", None) if impl is not None else None
    critic = None
    if value_func is not None:
        layers = [*value_func._encoder._layers, value_func._fc]
        critic = mlp_actor_from_module(
            nn.Sequential(*copy.deepcopy(layers)).cpu().float(), mean, scale
        )
        with torch.no_grad():
            x = probe_t.to(impl.device)
            theirs = value_func(scaler.transform(x) if scaler is not None else x).cpu()
            _check("state-value network", critic(probe_t), theirs, offline_dir)
    return OfflineNetworks(
        actor.eval(), critic.eval() if critic is not None else None, policy.manifest, ablation
    )


def load_offline_actor(offline_dir: Path, table: ActionTable | None = None) -> MlpActor:
    """Just the actor of :func:`load_offline_networks`."""
    return load_offline_networks(offline_dir, table).actor
