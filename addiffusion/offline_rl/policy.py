"""Load a trained offline policy safely and act with action masks.

A ``.d3`` file is a pickle, and shared files are untrusted: :func:`load_policy` unpickles it only
when its hash is one the pipeline recorded away from the file (the project's ``dvc.lock`` or the
trust store ``offline-rl train`` writes: :mod:`addiffusion.offline_rl.trust`), and matches the
``manifest.json`` its training run wrote beside it.

Besides the model, the manifest may restrict the policy (action-space and state ablations):

* ``allowed_actions``: names from the action table (``["jump-1", "stop"]``); absent or null means
  every action. The policy never takes another one: every mask it is given is ANDed with this set
  (a row left with no action keeps its own mask).
* ``observation_drop``: parts of the observation (:data:`~addiffusion.diffusion.mdp.
  OBSERVATION_PARTS`) the policy was trained without (their columns were zero in its data:
  :func:`~addiffusion.diffusion.mdp.drop_parts`); absent, null or empty means none. The policy
  zeroes those columns of every observation, and its exported networks ignore them. Needs the
  manifest's ``observation`` entry (the dataset's :class:`~addiffusion.diffusion.mdp.
  ObservationLayout` as ``to_dict()``) to find the columns.
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
from addiffusion.diffusion.mdp import OBSERVATION_PARTS, ObservationLayout, drop_parts
from addiffusion.offline_rl import trust
from addiffusion.offline_rl.config import ALGORITHMS
from addiffusion.policy.combine import BCQScores, EnsembleMean, bcq_scores, restrict_mask_np

MANIFEST_FORMAT = "addiffusion.offline_rl.manifest/1"
D3RLPY_TYPES = {name: algo.d3rlpy_type for name, algo in ALGORITHMS.items()}
"""Our algorithm names -> the d3rlpy config type stored in the ``.d3`` file
(:data:`addiffusion.offline_rl.config.ALGORITHMS`, the one table of algorithms)."""
GREEDY_IN_Q = ("cql", "bcq")
"""Algorithms whose action is greedy in Q (probabilities one-hot); the others have a categorical
policy (probabilities: the masked softmax of its logits)."""


class PolicyLoadError(UserError, RuntimeError):
    """A policy file is missing, does not match its manifest, or is of the wrong kind."""


def allowed_actions(
    manifest: dict[str, Any], table: ActionTable, where: str = "manifest"
) -> tuple[str, ...] | None:
    """The manifest's ``allowed_actions`` as names in ``table`` order, or None (every action).

    Raises :class:`PolicyLoadError` (naming ``where``, the key and the bad entry) unless it is
    absent, null or a non-empty list of distinct names of ``table``.
    """
    names = manifest.get("allowed_actions")
    if names is None:
        return None
    key = f"{where} 'allowed_actions'"
    if not isinstance(names, list) or not names:
        raise PolicyLoadError(
            f"{key} must be a non-empty list of action names (or null for every action), got "
            f"{names!r}"
        )
    for name in names:
        if not isinstance(name, str) or name not in table.names:
            raise PolicyLoadError(
                f"{key}: unknown action {name!r} (the action table has {list(table.names)})"
            )
    if len(set(names)) != len(names):
        raise PolicyLoadError(f"{key} names an action twice: {names}")
    return tuple(n for n in table.names if n in names)


def observation_drop(
    manifest: dict[str, Any], where: str = "manifest"
) -> tuple[tuple[str, ...], ObservationLayout | None]:
    """The manifest's ``observation_drop`` (in :data:`OBSERVATION_PARTS` order; empty when absent
    or null) and its ``observation`` layout (None when absent or null).

    Raises :class:`PolicyLoadError` (naming ``where`` and the key) on an unknown or repeated part,
    a malformed layout, a layout whose dim is not ``observation_dim``, or parts to drop without a
    layout.
    """
    drop = manifest.get("observation_drop")
    key = f"{where} 'observation_drop'"
    if drop is None:
        drop = []
    if not isinstance(drop, list):
        raise PolicyLoadError(f"{key} must be a list of observation parts, got {drop!r}")
    for part in drop:
        if not isinstance(part, str) or part not in OBSERVATION_PARTS:
            raise PolicyLoadError(
                f"{key}: unknown observation part {part!r} (expected some of "
                f"{', '.join(OBSERVATION_PARTS)})"
            )
    if len(set(drop)) != len(drop):
        raise PolicyLoadError(f"{key} names a part twice: {drop}")
    raw = manifest.get("observation")
    layout = None
    if raw is not None:
        try:
            if not isinstance(raw, dict):
                raise TypeError(f"expected an object, got {type(raw).__name__}")
            layout = ObservationLayout.from_dict(raw)
        except (KeyError, TypeError, ValueError) as e:
            raise PolicyLoadError(
                f"{where} 'observation' is not an observation layout ({e!r}): {raw!r}"
            ) from e
        dim = manifest.get("observation_dim")
        if dim is not None and layout.dim != int(dim):
            raise PolicyLoadError(
                f"{where} 'observation' has dim {layout.dim}, but observation_dim is {dim}"
            )
    if drop and layout is None:
        raise PolicyLoadError(
            f"{key} is {drop} but {where} has no 'observation' entry (the dataset's observation "
            "layout), which says where those columns are"
        )
    return tuple(p for p in OBSERVATION_PARTS if p in drop), layout


class OfflinePolicy:
    """A trained d3rlpy algorithm behind a masked act / probability API.

    ``algo_name`` is ``iql`` or ``bc`` (a categorical policy: probabilities are the masked softmax
    of its logits), ``cql`` (greedy in the mean Q: probabilities are one-hot on the best legal
    action) or ``bcq`` (discrete BCQ, greedy in the mean Q among the actions its imitator finds
    likely enough: :func:`~addiffusion.policy.combine.bcq_scores`; probabilities one-hot).

    The manifest's ``allowed_actions`` and ``observation_drop`` restrict it (see the module
    docstring): :attr:`allowed`, :attr:`observation_drop`.
    """

    def __init__(self, algo: QLearningAlgoBase[Any, Any], manifest: dict[str, Any]):
        self.algo = algo
        self.manifest = manifest
        self.algo_name: str = manifest["algo"]
        self.observation_dim: int = int(manifest["observation_dim"])
        self.action_size: int = int(manifest["action_size"])
        self.actions: ActionTable = ActionTable.from_dict(manifest["actions"], "manifest 'actions'")
        """The action table the policy was trained on (the dataset's); ``n == action_size``."""
        self.allowed_actions: tuple[str, ...] | None = allowed_actions(manifest, self.actions)
        """The manifest's ``allowed_actions`` (in table order), None for every action."""
        drop, layout = observation_drop(manifest)
        self.observation_drop: tuple[str, ...] = drop
        """Observation parts the policy was trained without (their columns are zeroed)."""
        self.observation: ObservationLayout | None = layout
        """The dataset's observation layout, when the manifest records it."""

    @property
    def allowed(self) -> np.ndarray:
        """``(n,)`` bool: the actions the policy may take (all True when unrestricted)."""
        if self.allowed_actions is None:
            return np.ones(self.action_size, dtype=bool)
        return np.array([n in self.allowed_actions for n in self.actions.names])

    @property
    def keep_columns(self) -> np.ndarray:
        """``(D,)`` bool: False on the observation columns the policy ignores."""
        if not self.observation_drop:
            return np.ones(self.observation_dim, dtype=bool)
        assert self.observation is not None
        return self.observation.keep_mask(self.observation_drop)

    @property
    def action_flexibility(self) -> float:
        """BCQ's imitator threshold (``DiscreteBCQConfig.action_flexibility``)."""
        if self.algo_name != "bcq":
            raise ValueError(f"action_flexibility is BCQ's, this is a {self.algo_name!r} policy")
        return float(self.algo.config.action_flexibility)

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

    def restrict(self, mask: np.ndarray) -> np.ndarray:
        """``mask`` (B, n) bool ANDed with :attr:`allowed`; a row left with no action keeps its
        own mask (cannot happen with the ablations' action spaces, which all hold jump-1 and
        stop)."""
        return restrict_mask_np(mask, None if self.allowed_actions is None else self.allowed)

    def drop(self, obs: np.ndarray) -> np.ndarray:
        """``obs`` (B, D) with the columns of :attr:`observation_drop` zeroed (a copy when any
        is dropped): what the trained networks see."""
        if not self.observation_drop:
            return obs
        assert self.observation is not None
        return drop_parts(obs, self.observation, self.observation_drop)

    def _bcq_parts(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """BCQ's imitator log-probabilities and mean Q of scaled observations ``x``, (B, n)
        each, as ``DiscreteBCQImpl.inner_predict_best_action`` computes them."""
        impl = self.algo.impl
        assert impl is not None
        log_probs = torch.log_softmax(_categorical_policy(self)(x).logits, dim=1)
        return log_probs, impl._q_func_forwarder.compute_expected_q(x)

    def _forward(self, obs: np.ndarray) -> tuple[torch.Tensor, ...]:
        """The d3rlpy networks' outputs on checked observations: (logits,) of the categorical
        policy (iql, bc) or (imitator log-probs, mean Q) (bcq)."""
        obs = self.drop(obs)
        impl = self.algo.impl
        assert impl is not None
        x = torch.as_tensor(obs, device=impl.device)
        with torch.no_grad():
            if self.algo.observation_scaler is not None:
                x = self.algo.observation_scaler.transform(x)
            impl.modules.set_eval()
            if self.algo_name == "bcq":
                return self._bcq_parts(x)
            cat = _categorical_policy(self)
            # The raw head output: torch's Categorical would shift logits by logsumexp.
            return (cat._fc(cat._encoder(x)),)

    def bcq_parts(self, obs: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """A BCQ policy's imitator log-probabilities and mean Q, (B, n) float32 each (the
        dropped observation parts zeroed first): what :meth:`scores` combines."""
        if self.algo_name != "bcq":
            raise ValueError(f"bcq_parts needs a bcq policy, this is {self.algo_name!r}")
        obs, _ = self._check(obs, None)
        log_probs, q = self._forward(obs)
        return log_probs.cpu().numpy(), q.cpu().numpy()

    def scores(self, obs: np.ndarray) -> np.ndarray:
        """Unmasked preference per action, (B, n) float32: logits (iql, bc), mean Q (cql), or
        BCQ's :func:`~addiffusion.policy.combine.bcq_scores` (mean Q where the imitator keeps
        the action, below every kept one where it does not). The dropped observation parts are
        zeroed first. Ignores :attr:`allowed` (:meth:`masked_scores` applies it)."""
        obs, _ = self._check(obs, None)
        if self.algo_name == "cql":
            obs = self.drop(obs)
            n = obs.shape[0]
            cols = [self.algo.predict_value(obs, np.full(n, a)) for a in range(self.action_size)]
            return np.stack(cols, axis=1).astype(np.float32)
        out = self._forward(obs)
        if self.algo_name == "bcq":
            with torch.no_grad():
                scores = bcq_scores(out[0], out[1], self.action_flexibility)
        else:
            scores = out[0]
        return scores.cpu().numpy().astype(np.float32)

    def masked_scores(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """:meth:`scores` with illegal actions (outside ``mask`` AND :attr:`allowed`: see
        :meth:`restrict`) set to -inf: (B, n)."""
        obs, mask = self._check(obs, mask)
        return np.where(self.restrict(mask), self.scores(obs), -np.inf).astype(np.float32)

    def act(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Greedy legal action. obs: (B, D) float32, mask: (B, n) bool -> (B,) int64."""
        return self.masked_scores(obs, mask).argmax(axis=1).astype(np.int64)

    def action_probs(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Probabilities over legal actions, (B, n) float32, zero on illegal ones (and on the
        actions outside :attr:`allowed`)."""
        z = self.masked_scores(obs, mask).astype(np.float64)
        if self.algo_name in GREEDY_IN_Q:
            probs = np.zeros_like(z)
            probs[np.arange(z.shape[0]), z.argmax(axis=1)] = 1.0
            return probs.astype(np.float32)
        z = z - z.max(axis=1, keepdims=True)
        e = np.exp(z)
        return (e / e.sum(axis=1, keepdims=True)).astype(np.float32)


def _categorical_policy(policy: OfflinePolicy) -> CategoricalPolicy:
    """The d3rlpy CategoricalPolicy of an iql (``modules.policy``) or bc / bcq
    (``modules.imitator``) policy."""
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
    allowed_actions(manifest, table, str(path))
    observation_drop(manifest, str(path))
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
    equals the trained policy's logits; the columns of dropped observation parts
    (:attr:`OfflinePolicy.observation_drop`) are then zeroed in ``W'``, as zeroed inputs would
    be. An identical MLP (e.g. sb3's ``net_arch=dict(pi=hidden_units)`` with
    ``activation_fn=nn.ReLU`` followed by ``action_net``) can copy these weights. A copy:
    changing it does not change ``policy``. CQL and BCQ have no actor (BCQ's imitator is not its
    policy) and raise ``ValueError``.
    """
    if policy.algo_name not in ("iql", "bc"):
        raise ValueError(
            f"actor_logits_module needs a policy network (iql or bc), got {policy.algo_name!r}"
        )
    return _plain_mlp(_categorical_policy(policy), policy)


def scores_module(policy: OfflinePolicy) -> nn.Module:
    """:meth:`OfflinePolicy.scores` as a plain torch module: obs (B, D) float32 -> (B, n).

    iql / bc: :func:`actor_logits_module`. cql: an :class:`~addiffusion.policy.combine.
    EnsembleMean` of one such MLP per Q function (d3rlpy's greedy action is the argmax of that
    mean). bcq: a :class:`~addiffusion.policy.combine.BCQScores` of the imitator's MLP and the Q
    functions' (d3rlpy's greedy action is its argmax). Raw observations in (the standardisation
    folded in and the dropped parts ignored as in :func:`actor_logits_module`); a copy, on the
    CPU, in eval mode. The manifest's ``allowed_actions`` is a mask, not a score: apply it with
    :meth:`OfflinePolicy.restrict` (the ONNX export does).
    """
    if policy.algo_name not in GREEDY_IN_Q:
        return actor_logits_module(policy)
    impl = policy.algo.impl
    assert impl is not None
    heads = list(impl.modules.q_funcs)
    for q in heads:
        if not isinstance(q, DiscreteMeanQFunction):
            raise ValueError(
                f"scores_module needs {policy.algo_name.upper()}'s default mean Q functions "
                f"(q_func_factory 'mean'), got {type(q).__name__}"
            )
    qs = [_plain_mlp(q, policy) for q in heads]
    if policy.algo_name == "bcq":
        imitator = _plain_mlp(_categorical_policy(policy), policy)
        return BCQScores(imitator, qs, policy.action_flexibility).eval()
    return EnsembleMean(qs).eval()


def _plain_mlp(head: nn.Module, policy: OfflinePolicy) -> nn.Sequential:
    """A d3rlpy head (``_encoder`` a VectorEncoder, ``_fc`` the output Linear) as one
    nn.Sequential on the CPU with ``policy``'s observation standardisation folded in and its
    dropped observation columns zeroed in the first Linear."""
    layers: list[nn.Module] = []
    for layer in head._encoder._layers:
        if isinstance(layer, nn.Linear | nn.ReLU):
            layers.append(copy.deepcopy(layer))
        else:
            raise ValueError(f"unsupported layer {layer!r} in the policy encoder")
    layers.append(copy.deepcopy(head._fc))
    mlp = nn.Sequential(*layers).cpu().float()
    first = mlp[0]
    assert isinstance(first, nn.Linear)
    scaler = policy.algo.observation_scaler
    if scaler is not None:
        if scaler.get_type() != "standard":
            raise ValueError(f"cannot fold observation scaler {scaler.get_type()!r}")
        mean = torch.as_tensor(np.asarray(scaler.mean), dtype=torch.float32)
        scale = torch.as_tensor(np.asarray(scaler.std), dtype=torch.float32) + scaler.eps
        with torch.no_grad():
            w = first.weight / scale.view(1, -1)
            first.bias.copy_(first.bias - w @ mean)
            first.weight.copy_(w)
    drop = torch.as_tensor(~policy.keep_columns)
    if bool(drop.any()):
        # A zeroed input x_j enters the folded layer as W'_j 0 = 0, and its standardised value
        # -mean_j / scale_j is already in the folded bias: zeroing W'_j is exact.
        with torch.no_grad():
            first.weight[:, drop] = 0.0
    mlp.eval()
    return mlp
