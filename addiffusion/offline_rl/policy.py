"""Load a trained offline policy safely and act with action masks.

A ``.d3`` file is a pickle, and shared files are untrusted: :func:`load_policy` unpickles it only
when its hash is one the pipeline recorded away from the file (the project's ``dvc.lock`` or the
trust store ``offline-rl train`` writes: :mod:`addiffusion.offline_rl.trust`), and matches the
``manifest.json`` its training run wrote beside it.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any

import d3rlpy
import numpy as np
import torch
from d3rlpy.algos.qlearning.base import QLearningAlgoBase
from d3rlpy.models.torch import CategoricalPolicy, DiscreteMeanQFunction
from torch import nn

import addiffusion.offline_rl.discrete_iql  # noqa: F401  (registers discrete_iql for load_learnable)
from addiffusion.config import UserError
from addiffusion.diffusion.actions import ActionTable
from addiffusion.offline_rl import trust

MANIFEST_FORMAT = "addiffusion.offline_rl.manifest/1"
D3RLPY_TYPES = {"iql": "discrete_iql", "cql": "discrete_cql", "bc": "discrete_bc"}
"""Our algorithm names -> the d3rlpy config type stored in the ``.d3`` file."""


class PolicyLoadError(UserError, RuntimeError):
    """A policy file is missing, does not match its manifest, or is of the wrong kind."""


class OfflinePolicy:
    """A trained d3rlpy algorithm behind a masked act / probability API.

    ``algo_name`` is ``iql`` or ``bc`` (a categorical policy: probabilities are the masked softmax
    of its logits) or ``cql`` (greedy in Q: probabilities are one-hot on the best legal action).
    """

    def __init__(self, algo: QLearningAlgoBase[Any, Any], manifest: dict[str, Any]):
        self.algo = algo
        self.manifest = manifest
        self.algo_name: str = manifest["algo"]
        self.observation_dim: int = int(manifest["observation_dim"])
        self.action_size: int = int(manifest["action_size"])
        self.actions: ActionTable = ActionTable.from_dict(manifest["actions"], "manifest 'actions'")
        """The action table the policy was trained on (the dataset's); ``n == action_size``."""

    def check_actions(self, table: ActionTable, where: str = "the task") -> None:
        """Raise if ``table`` (e.g. a sampler's or a dataset's) is not the policy's table."""
        if table != self.actions:
            raise ValueError(
                f"the policy was trained on actions {list(self.actions.names)} "
                f"({self.actions.to_dict()}), but {where} has {list(table.names)} "
                f"({table.to_dict()})"
            )

    def _check(self, obs: np.ndarray, mask: np.ndarray | None) -> tuple[np.ndarray, np.ndarray]:
        obs = np.asarray(obs, dtype=np.float32)
        if obs.ndim != 2 or obs.shape[1] != self.observation_dim:
            raise ValueError(
                f"obs must have shape (B, {self.observation_dim}) (the policy's observation "
                f"dim), got {obs.shape}"
            )
        if mask is None:
            return obs, np.ones((obs.shape[0], self.action_size), dtype=bool)
        mask = np.asarray(mask)
        if mask.dtype != np.bool_ or mask.shape != (obs.shape[0], self.action_size):
            raise ValueError(
                f"mask must be bool of shape ({obs.shape[0]}, {self.action_size}), got "
                f"{mask.dtype} {mask.shape}"
            )
        empty = np.flatnonzero(~mask.any(axis=1))
        if empty.size:
            raise ValueError(f"mask rows {empty[:10].tolist()} allow no action at all")
        return obs, mask

    def scores(self, obs: np.ndarray) -> np.ndarray:
        """Unmasked preference per action, (B, n) float32: logits (iql, bc) or mean Q (cql)."""
        obs, _ = self._check(obs, None)
        impl = self.algo.impl
        assert impl is not None
        if self.algo_name == "cql":
            n = obs.shape[0]
            cols = [self.algo.predict_value(obs, np.full(n, a)) for a in range(self.action_size)]
            return np.stack(cols, axis=1).astype(np.float32)
        x = torch.as_tensor(obs, device=impl.device)
        with torch.no_grad():
            if self.algo.observation_scaler is not None:
                x = self.algo.observation_scaler.transform(x)
            impl.modules.set_eval()
            cat = _categorical_policy(self)
            # The raw head output: torch's Categorical would shift logits by logsumexp.
            logits = cat._fc(cat._encoder(x))
        return logits.cpu().numpy().astype(np.float32)

    def masked_scores(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """:meth:`scores` with illegal actions set to -inf: (B, n)."""
        obs, mask = self._check(obs, mask)
        return np.where(mask, self.scores(obs), -np.inf).astype(np.float32)

    def act(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Greedy legal action. obs: (B, D) float32, mask: (B, n) bool -> (B,) int64."""
        return self.masked_scores(obs, mask).argmax(axis=1).astype(np.int64)

    def action_probs(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Probabilities over legal actions, (B, n) float32, zero on illegal ones."""
        z = self.masked_scores(obs, mask).astype(np.float64)
        if self.algo_name == "cql":
            probs = np.zeros_like(z)
            probs[np.arange(z.shape[0]), z.argmax(axis=1)] = 1.0
            return probs.astype(np.float32)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _categorical_policy(policy: OfflinePolicy) -> CategoricalPolicy:
    """The d3rlpy CategoricalPolicy of an iql (``modules.policy``) or bc (``modules.imitator``)."""
    impl = policy.algo.impl
    assert impl is not None
    module = getattr(impl.modules, "policy" if policy.algo_name == "iql" else "imitator")
    assert isinstance(module, CategoricalPolicy)
    return module


def read_manifest(path: Path) -> dict[str, Any]:
    path = Path(path)
    if not path.exists():
        raise PolicyLoadError(
            f"no manifest at {path}: a .d3 policy is a pickle and is only loaded after its sha256 "
            "matches the manifest.json written by its training run"
        )
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise PolicyLoadError(
            f"{path} is not valid JSON ({e}): rewrite it by retraining (addiffusion offline-rl "
            "train), or restore the manifest.json of the run that wrote the policy"
        ) from e
    if not isinstance(manifest, dict) or manifest.get("format") != MANIFEST_FORMAT:
        raise PolicyLoadError(
            f"{path} is not an offline_rl manifest (expected format {MANIFEST_FORMAT!r}, got "
            f"{manifest.get('format') if isinstance(manifest, dict) else type(manifest).__name__!r})"
        )
    for key in ("algo", "sha256", "observation_dim", "action_size", "actions", "d3rlpy_type"):
        if key not in manifest:
            raise PolicyLoadError(f"{path} has no {key!r} entry")
    try:
        table = ActionTable.from_dict(manifest["actions"], f"{path} 'actions'")
    except ValueError as e:
        raise PolicyLoadError(str(e)) from e
    if table.n != int(manifest["action_size"]):
        raise PolicyLoadError(
            f"{path}: action_size {manifest['action_size']} != the action table's {table.n}"
        )
    return manifest


def load_policy(
    path: Path,
    manifest: Path | None = None,
    device: str = "cpu:0",
    trusted_sha256: str | None = None,
) -> OfflinePolicy:
    """Load ``policy.d3`` once it is trusted and matches ``manifest`` (default: the
    ``manifest.json`` beside it). Raises :class:`PolicyLoadError` on any mismatch.

    Trusted: its md5 is the one the project's ``dvc.lock`` records for it as a stage output, or
    its sha256 is in the trust store (written by ``offline-rl train`` and ``offline-rl trust``),
    or equals ``trusted_sha256`` (a hash the caller checked). The bytes hashed are the bytes
    unpickled: the file is read once.
    """
    path = Path(path)
    manifest_path = Path(manifest) if manifest is not None else path.parent / "manifest.json"
    info = read_manifest(manifest_path)
    if not path.is_file():
        raise PolicyLoadError(f"policy file {path} not found")
    data = path.read_bytes()
    digest = hashlib.sha256(data).hexdigest()
    if digest != info["sha256"]:
        raise PolicyLoadError(
            f"refusing to load {path}: its sha256 is {digest}, but {manifest_path} records "
            f"{info['sha256']}. The file changed after training (or belongs to another run); "
            "retrain, or pass the manifest of the run that wrote it."
        )
    if trusted_sha256 is None or trusted_sha256.lower() != digest:
        try:
            reason = trust.trusted_by(path, data)
        except trust.TrustStoreError as e:
            raise PolicyLoadError(f"refusing to load {path}: {e}") from e
        if reason is None:
            raise PolicyLoadError(untrusted_message(path, digest))
    if info["algo"] not in D3RLPY_TYPES:
        raise PolicyLoadError(
            f"{manifest_path}: algo must be one of {', '.join(D3RLPY_TYPES)}, got {info['algo']!r}"
        )
    # d3rlpy reads a path: give it a private copy of the checked bytes, so that the file cannot
    # be swapped between the check and the unpickling.
    with tempfile.TemporaryDirectory(prefix="addiffusion-d3-") as tmp:
        copy_path = os.path.join(tmp, "policy.d3")
        with open(copy_path, "wb") as f:
            f.write(data)
        algo = d3rlpy.load_learnable(copy_path, device=device)
    if algo.config.get_type() != info["d3rlpy_type"]:
        raise PolicyLoadError(
            f"{path} holds a {algo.config.get_type()!r} model but {manifest_path} says "
            f"{info['d3rlpy_type']!r}"
        )
    assert isinstance(algo, QLearningAlgoBase)
    return OfflinePolicy(algo, info)


def untrusted_message(path: Path, digest: str) -> str:
    """Why ``path`` is refused and how to trust it."""
    return (
        f"refusing to load {path}: a .d3 file is a pickle, which runs code when loaded, and its "
        f"sha256 {digest} is not one this pipeline recorded ({trust.untrusted_detail(path)}). "
        "If this project trained it, rerun the stage (`dvc repro offline_rl`) or "
        "`addiffusion offline-rl train`; if it came from elsewhere and you trust its source, "
        f"run `addiffusion offline-rl trust {path}` (or pass --trust-sha256 {digest})."
    )


def actor_logits_module(policy: OfflinePolicy) -> nn.Sequential:
    """The policy network as a plain torch MLP: obs (B, D) float32 -> logits (B, n).

    Architecture (for ``hidden_units = [h1, ..., hn]``)::

        nn.Sequential(Linear(D, h1), ReLU(), Linear(h1, h2), ReLU(), ..., Linear(hn, n))

    state_dict keys ``0.weight, 0.bias, 2.weight, ...``; the last Linear is the logits head. The
    observation standardisation (if any) is folded into the first Linear
    (``W' = W / (std + eps)``, ``b' = b - W' mean``), so the module takes raw observations and
    equals the trained policy's logits. An identical MLP (e.g. sb3's ``net_arch=dict(pi=hidden_units)``
    with ``activation_fn=nn.ReLU`` followed by ``action_net``) can copy these weights. A copy:
    changing it does not change ``policy``. CQL has no actor and raises ``ValueError``.
    """
    if policy.algo_name not in ("iql", "bc"):
        raise ValueError(
            f"actor_logits_module needs a policy network (iql or bc), got {policy.algo_name!r}"
        )
    return _plain_mlp(_categorical_policy(policy), policy)


class EnsembleMean(nn.Module):
    """The mean of its members' outputs: d3rlpy's ``reduction="mean"`` over a Q ensemble."""

    def __init__(self, members: list[nn.Module]):
        super().__init__()
        self.members = nn.ModuleList(members)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.stack([m(x) for m in self.members]).mean(dim=0)


def scores_module(policy: OfflinePolicy) -> nn.Module:
    """:meth:`OfflinePolicy.scores` as a plain torch module: obs (B, D) float32 -> (B, n).

    iql / bc: :func:`actor_logits_module`. cql: an :class:`EnsembleMean` of one such MLP per Q
    function (d3rlpy's greedy action is the argmax of that mean). Raw observations in (the
    standardisation folded in as in :func:`actor_logits_module`); a copy, on the CPU, in eval mode.
    """
    if policy.algo_name != "cql":
        return actor_logits_module(policy)
    impl = policy.algo.impl
    assert impl is not None
    heads = list(impl.modules.q_funcs)
    for q in heads:
        if not isinstance(q, DiscreteMeanQFunction):
            raise ValueError(
                f"scores_module needs CQL's default mean Q functions (q_func_factory 'mean'), "
                f"got {type(q).__name__}"
            )
    return EnsembleMean([_plain_mlp(q, policy) for q in heads]).eval()


def _plain_mlp(head: nn.Module, policy: OfflinePolicy) -> nn.Sequential:
    """A d3rlpy head (``_encoder`` a VectorEncoder, ``_fc`` the output Linear) as one
    nn.Sequential on the CPU with ``policy``'s observation standardisation folded in."""
    layers: list[nn.Module] = []
    for layer in head._encoder._layers:
        if isinstance(layer, nn.Linear | nn.ReLU):
            layers.append(copy.deepcopy(layer))
        else:
            raise ValueError(f"unsupported layer {layer!r} in the policy encoder")
    layers.append(copy.deepcopy(head._fc))
    mlp = nn.Sequential(*layers).cpu().float()
    scaler = policy.algo.observation_scaler
    if scaler is not None:
        first = mlp[0]
        assert isinstance(first, nn.Linear)
        if scaler.get_type() != "standard":
            raise ValueError(f"cannot fold observation scaler {scaler.get_type()!r}")
        mean = torch.as_tensor(np.asarray(scaler.mean), dtype=torch.float32)
        scale = torch.as_tensor(np.asarray(scaler.std), dtype=torch.float32) + scaler.eps
        with torch.no_grad():
            w = first.weight / scale.view(1, -1)
            first.bias.copy_(first.bias - w @ mean)
            first.weight.copy_(w)
    mlp.eval()
    return mlp
