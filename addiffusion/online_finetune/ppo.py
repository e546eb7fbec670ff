"""MaskablePPO (sb3-contrib) whose policy starts as the IQL actor; the fine-tuned actor's files.

Saved actor (no pickle anywhere)::

    <out>/actor.safetensors   MlpActor state dict (float32)
    <out>/manifest.json       format, version, ActorSpec, the action table
                              (``ActionTable.to_dict()``), sha256 of actor.safetensors, the
                              ablation (``allowed_actions``, ``observation_drop``) and the
                              observation layout (``observation``), the offline manifest's keys

:class:`FinetunedPolicy` applies the ablation whenever it acts: its masks are ANDed with the
allowed actions and the dropped observation parts are zeroed before the actor sees them, as in
training (:mod:`addiffusion.online_finetune.ablation`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import gymnasium as gym
import numpy as np
import torch
from safetensors.torch import load_file, save_file
from sb3_contrib import MaskablePPO
from stable_baselines3.common.torch_layers import BaseFeaturesExtractor
from stable_baselines3.common.vec_env import VecEnv
from torch import nn

from addiffusion.datasets.store import sha256_file
from addiffusion.diffusion.actions import ActionTable
from addiffusion.online_finetune.ablation import Ablation
from addiffusion.online_finetune.actor import ACTIVATIONS, ActorSpec, MlpActor, Standardize
from addiffusion.online_finetune.config import OnlineFinetuneConfig
from addiffusion.policy.combine import restrict_mask_np

MANIFEST_FORMAT = "addiffusion-mlp-actor"
MANIFEST_VERSION = 3
"""3: the manifest records the ablation (``allowed_actions``, ``observation_drop``) and the
observation layout (``observation``); 2 recorded the action table (``actions``) only and still
loads (as unrestricted); 1 had a fixed 3-action map."""
READABLE_VERSIONS = (2, 3)
WEIGHTS_FILE = "actor.safetensors"


class StandardizeExtractor(BaseFeaturesExtractor):
    """SB3 features extractor: the actor's observation standardisation (no parameters)."""

    def __init__(
        self,
        observation_space: gym.spaces.Box,
        mean: Sequence[float] | None = None,
        std: Sequence[float] | None = None,
    ) -> None:
        dim = int(observation_space.shape[0])
        super().__init__(observation_space, features_dim=dim)
        self.standardize = Standardize(dim)
        if mean is not None and std is not None:
            self.standardize.mean.copy_(torch.tensor(mean, dtype=torch.float32))
            self.standardize.std.copy_(torch.tensor(std, dtype=torch.float32))

    def forward(self, observations: torch.Tensor) -> torch.Tensor:
        return self.standardize(observations.float())


def _policy_linears(model: MaskablePPO) -> list[nn.Linear]:
    hidden = [m for m in model.policy.mlp_extractor.policy_net if isinstance(m, nn.Linear)]
    return [*hidden, model.policy.action_net]


def _copy_linears(src: list[nn.Linear], dst: list[nn.Linear]) -> None:
    with torch.no_grad():  # in place, so the optimizer keeps pointing at the same tensors
        for s, d in zip(src, dst, strict=True):
            d.weight.copy_(s.weight)
            d.bias.copy_(s.bias)


def _linears(mlp: MlpActor) -> list[nn.Linear]:
    return [m for m in mlp.hidden if isinstance(m, nn.Linear)] + [mlp.head]


def build_maskable_ppo(
    venv: VecEnv,
    actor: MlpActor,
    cfg: OnlineFinetuneConfig,
    device: str | torch.device,
    critic: MlpActor | None = None,
    *,
    seed: int | None = None,
    fresh: bool = False,
) -> MaskablePPO:
    """MaskablePPO whose policy (``mlp_extractor.policy_net`` + ``action_net``) is ``actor``:
    same hidden sizes, activation, observation standardisation (the shared features extractor)
    and weights. The value network (``mlp_extractor.value_net`` + ``value_net``) is ``critic``
    (obs -> (B, 1), e.g. IQL's V) when given, else has the actor's hidden sizes and a fresh
    orthogonal init.

    ``fresh``: the same architecture and observation standardisation, but SB3's own random
    (orthogonal) init for both networks: the from-scratch baseline. ``seed``: SB3's seed
    (default ``cfg.seeds[0]``); it seeds torch, numpy and ``random`` before the networks are
    built, so the fresh init is the seed's.
    """
    spec = actor.spec
    n_actions = int(getattr(venv.action_space, "n", -1))
    if spec.n_actions != n_actions:
        raise ValueError(
            f"the actor has {spec.n_actions} logits, the env's action space has {n_actions} "
            "actions: the offline policy was trained on another action table"
        )
    vf_hidden = spec.hidden_sizes
    if critic is not None:
        c = critic.spec
        same_input = c.standardize == spec.standardize and (
            not c.standardize
            or (
                torch.equal(critic.standardize.mean, actor.standardize.mean)
                and torch.equal(critic.standardize.std, actor.standardize.std)
            )
        )
        if c.n_actions != 1 or c.obs_dim != spec.obs_dim or c.activation != spec.activation:
            raise ValueError(
                f"critic must map obs of dim {spec.obs_dim} to one value with the actor's "
                f"activation {spec.activation!r}; got {c}"
            )
        if not same_input:
            raise ValueError("actor and critic must standardise observations identically")
        vf_hidden = c.hidden_sizes
    if venv.observation_space.shape != (spec.obs_dim,):
        raise ValueError(
            f"the actor takes observations of dim {spec.obs_dim}, the env gives "
            f"{venv.observation_space.shape}: the offline policy was trained on another layout"
        )
    std = actor.standardize
    model = MaskablePPO(
        "MlpPolicy",
        venv,
        learning_rate=cfg.learning_rate,
        n_steps=cfg.n_steps,
        batch_size=cfg.batch_size,
        n_epochs=cfg.n_epochs,
        gamma=cfg.gamma,
        gae_lambda=cfg.gae_lambda,
        clip_range=cfg.clip_range,
        ent_coef=cfg.ent_coef,
        seed=cfg.seeds[0] if seed is None else seed,
        device=device,
        verbose=0,
        policy_kwargs={
            "net_arch": {"pi": list(spec.hidden_sizes), "vf": list(vf_hidden)},
            "activation_fn": ACTIVATIONS[spec.activation],
            "features_extractor_class": StandardizeExtractor,
            "features_extractor_kwargs": {
                "mean": std.mean.tolist() if spec.standardize else None,
                "std": std.std.tolist() if spec.standardize else None,
            },
        },
    )
    if fresh:
        return model
    _copy_linears(_linears(actor), _policy_linears(model))
    if critic is not None:
        policy = model.policy
        value_linears = [m for m in policy.mlp_extractor.value_net if isinstance(m, nn.Linear)]
        _copy_linears(_linears(critic), [*value_linears, policy.value_net])
    return model


def policy_logits(model: MaskablePPO, obs: torch.Tensor) -> torch.Tensor:
    """Unmasked logits of the PPO policy: ``(B, D) -> (B, table.n)``."""
    policy = model.policy
    features = policy.extract_features(obs.to(policy.device), policy.pi_features_extractor)
    return policy.action_net(policy.mlp_extractor.forward_actor(features))


def actor_from_ppo(model: MaskablePPO, spec: ActorSpec) -> MlpActor:
    """The PPO policy head as an :class:`MlpActor` (CPU, float32)."""
    actor = MlpActor(spec)
    dst = _linears(actor)
    extractor = model.policy.pi_features_extractor
    with torch.no_grad():
        for s, d in zip(_policy_linears(model), dst, strict=True):
            d.weight.copy_(s.weight.cpu())
            d.bias.copy_(s.bias.cpu())
        actor.standardize.mean.copy_(extractor.standardize.mean.cpu())
        actor.standardize.std.copy_(extractor.standardize.std.cpu())
    return actor.eval()


def save_actor(
    actor: MlpActor,
    table: ActionTable,
    out_dir: Path,
    extra: dict[str, Any] | None = None,
    *,
    ablation: Ablation | None = None,
) -> Path:
    """Write ``actor.safetensors`` + ``manifest.json`` (with ``table``, the actions the actor's
    logits are over, and ``ablation``, the restrictions it acts under); returns the manifest
    path."""
    ablation = ablation or Ablation()
    layout = ablation.observation
    if layout is not None and layout.dim != actor.spec.obs_dim:
        raise ValueError(
            f"the observation layout has dim {layout.dim}, the actor takes {actor.spec.obs_dim}"
        )
    if actor.spec.n_actions != table.n:
        raise ValueError(
            f"the actor has {actor.spec.n_actions} logits but the action table {table.n} actions "
            f"({list(table.names)})"
        )
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    weights = out_dir / WEIGHTS_FILE
    save_file({k: v.detach().cpu().contiguous() for k, v in actor.state_dict().items()}, weights)
    manifest = {
        "format": MANIFEST_FORMAT,
        "version": MANIFEST_VERSION,
        "architecture": actor.spec.to_dict(),
        "obs_dim": actor.spec.obs_dim,
        "action_size": table.n,
        "actions": table.to_dict(),
        "weights": WEIGHTS_FILE,
        "sha256": sha256_file(weights),
        **ablation.to_manifest(),
        **(extra or {}),
    }
    path = out_dir / "manifest.json"
    path.write_text(json.dumps(manifest, indent=2))
    return path


class FinetunedPolicy:
    """The fine-tuned actor for evaluation: greedy (or sampled) masked actions over
    :attr:`table` (the action table it was trained on; ``action_size == table.n``).

    ``allowed`` ``(table.n,)`` bool: the actions it may take (None: all); ``keep`` ``(D,)`` bool:
    the observation columns it sees (None: all; the others are zeroed): its ablation, applied to
    the full observations and the sampler's masks it is given."""

    def __init__(
        self,
        actor: MlpActor,
        manifest: dict[str, Any],
        table: ActionTable,
        allowed: np.ndarray | None = None,
        keep: np.ndarray | None = None,
    ) -> None:
        if actor.spec.n_actions != table.n:
            raise ValueError(
                f"the actor has {actor.spec.n_actions} logits but its action table {table.n}"
            )
        if allowed is not None and np.shape(allowed) != (table.n,):
            raise ValueError(f"allowed must have shape ({table.n},), got {np.shape(allowed)}")
        if keep is not None and np.shape(keep) != (actor.spec.obs_dim,):
            raise ValueError(f"keep must have shape ({actor.spec.obs_dim},), got {np.shape(keep)}")
        self.actor = actor.eval()
        self.manifest = manifest
        self.table = table
        self.action_size = table.n
        self.obs_dim = actor.spec.obs_dim
        self.allowed = None if allowed is None else np.asarray(allowed, dtype=bool)
        self.keep = None if keep is None else np.asarray(keep, dtype=bool)

    @torch.no_grad()
    def logits(self, obs: np.ndarray) -> np.ndarray:
        """``obs (B, D) float32 -> (B, table.n)`` float32 unmasked logits (of the observations
        with the dropped columns zeroed)."""
        obs = np.asarray(obs, dtype=np.float32)
        if obs.ndim != 2 or obs.shape[1] != self.obs_dim:
            raise ValueError(f"expected observations of shape (B, {self.obs_dim}), got {obs.shape}")
        if self.keep is not None:
            obs = np.where(self.keep, obs, np.float32(0.0))
        return self.actor(torch.from_numpy(obs)).numpy()

    def act(
        self, obs: np.ndarray, mask: np.ndarray, rng: np.random.Generator | None = None
    ) -> np.ndarray:
        """``obs (B, D) float32, mask (B, table.n) bool -> (B,) int64`` action ids, never a
        masked one (nor, where the mask allows one, an action outside :attr:`allowed`).

        Greedy (argmax of the masked logits) unless ``rng`` is given, then sampled. The mask is
        ANDed with :attr:`allowed` (a row left with no action keeps its own mask, as the offline
        policy's ``restrict`` does).
        """
        mask = np.asarray(mask, dtype=bool)
        logits = self.logits(obs)
        if mask.shape != logits.shape:
            raise ValueError(f"mask must have shape {logits.shape}, got {mask.shape}")
        if not mask.any(axis=1).all():
            raise ValueError(f"rows {np.flatnonzero(~mask.any(axis=1)).tolist()} allow no action")
        mask = restrict_mask_np(mask, self.allowed)
        masked = np.where(mask, logits, -np.inf)
        if rng is None:
            return masked.argmax(axis=1)
        p = np.exp(masked - masked.max(axis=1, keepdims=True))
        p /= p.sum(axis=1, keepdims=True)
        return np.array([rng.choice(p.shape[1], p=row) for row in p], dtype=np.int64)


def load_finetuned_policy(out_dir: Path) -> FinetunedPolicy:
    """Load what :func:`save_actor` wrote, refusing weights whose sha256 differs from the
    manifest's (a tampered or half-copied file)."""
    out_dir = Path(out_dir)
    path = out_dir / "manifest.json"
    if not path.exists():
        raise FileNotFoundError(f"{path} not found: not an online_finetune output folder")
    manifest = json.loads(path.read_text())
    if (
        manifest.get("format") != MANIFEST_FORMAT
        or manifest.get("version") not in READABLE_VERSIONS
    ):
        raise ValueError(
            f"{path}: expected format {MANIFEST_FORMAT!r} version "
            f"{' or '.join(map(str, READABLE_VERSIONS))}, got {manifest.get('format')!r} version "
            f"{manifest.get('version')!r}"
        )
    weights = out_dir / manifest["weights"]
    digest = sha256_file(weights)
    if digest != manifest["sha256"]:
        raise ValueError(
            f"{weights}: sha256 {digest} does not match {path} ({manifest['sha256']}); "
            "the file was changed after the run wrote it"
        )
    table = ActionTable.from_dict(manifest.get("actions"), f"{path} 'actions'")
    actor = MlpActor(ActorSpec.from_dict(manifest["architecture"]))
    actor.load_state_dict(load_file(weights))
    ablation = Ablation.from_manifest(manifest, table, str(path))
    if ablation.observation is not None and ablation.observation.dim != actor.spec.obs_dim:
        raise ValueError(
            f"{path}: 'observation' has dim {ablation.observation.dim}, the actor takes "
            f"{actor.spec.obs_dim}"
        )
    return FinetunedPolicy(actor, manifest, table, ablation.allowed(table), ablation.keep())
