"""The actor network shared by the IQL policy and PPO, and how it moves between them.

Architecture (the one d3rlpy's categorical policy has with its default vector encoder)::

    obs (B, D) float32 -> [standardise: (obs - mean) / std] -> Linear(D, h1) -> act -> ...
        -> Linear(h_{n-1}, h_n) -> act -> Linear(h_n, A) -> logits (B, A)

with ``A`` the size of the dataset's action table (``ActionTable.n``; the head's width is read
off the copied network, never assumed).

The optional standardisation is d3rlpy's ``StandardObservationScaler`` (fixed mean/std of the
offline training set). In MaskablePPO the standardisation is the (parameter-free) features
extractor shared by actor and critic (:class:`addiffusion.online_finetune.ppo.StandardizeExtractor`), the hidden layers are ``mlp_extractor.policy_net`` and
the output layer is ``action_net``, so the PPO policy's initial distribution *is* the IQL actor's.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import torch
from torch import nn

ACTIVATIONS: dict[str, type[nn.Module]] = {
    "relu": nn.ReLU,
    "tanh": nn.Tanh,
    "gelu": nn.GELU,
    "silu": nn.SiLU,
    "elu": nn.ELU,
    "leaky_relu": nn.LeakyReLU,
}


@dataclass(frozen=True)
class ActorSpec:
    """Everything needed to rebuild an :class:`MlpActor` (stored in ``manifest.json``)."""

    obs_dim: int
    hidden_sizes: tuple[int, ...]
    n_actions: int
    """Width of the logits head: the action table's ``n`` (1 for a state-value network)."""
    activation: str = "relu"
    standardize: bool = False

    def __post_init__(self) -> None:
        if self.activation not in ACTIVATIONS:
            raise ValueError(
                f"activation must be one of {', '.join(ACTIVATIONS)}, got {self.activation!r}"
            )
        if self.obs_dim < 1 or self.n_actions < 1 or any(h < 1 for h in self.hidden_sizes):
            raise ValueError(
                f"bad actor sizes: obs_dim={self.obs_dim}, hidden={self.hidden_sizes}, "
                f"n_actions={self.n_actions}"
            )

    def to_dict(self) -> dict:
        return {**asdict(self), "hidden_sizes": list(self.hidden_sizes)}

    @classmethod
    def from_dict(cls, data: dict) -> ActorSpec:
        return cls(
            obs_dim=int(data["obs_dim"]),
            hidden_sizes=tuple(int(h) for h in data["hidden_sizes"]),
            activation=str(data["activation"]),
            n_actions=int(data["n_actions"]),
            standardize=bool(data["standardize"]),
        )


def _mlp(sizes: Sequence[int], activation: str) -> list[nn.Module]:
    layers: list[nn.Module] = []
    for a, b in zip(sizes[:-1], sizes[1:], strict=True):
        layers += [nn.Linear(a, b), ACTIVATIONS[activation]()]
    return layers


class Standardize(nn.Module):
    """``(x - mean) / std`` with fixed buffers (identity when built without stats)."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.register_buffer("mean", torch.zeros(dim))
        self.register_buffer("std", torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return (x - self.mean) / self.std


class MlpActor(nn.Module):
    """``obs (B, D) float32 -> logits (B, n_actions)``; see the module docstring."""

    def __init__(self, spec: ActorSpec) -> None:
        super().__init__()
        self.spec = spec
        self.standardize = Standardize(spec.obs_dim)
        sizes = (spec.obs_dim, *spec.hidden_sizes)
        self.hidden = nn.Sequential(*_mlp(sizes, spec.activation))
        self.head = nn.Linear(sizes[-1], spec.n_actions)

    def forward(self, obs: torch.Tensor) -> torch.Tensor:
        x = self.standardize(obs) if self.spec.standardize else obs
        return self.head(self.hidden(x))


def mlp_actor_from_module(
    actor: nn.Module,
    obs_mean: torch.Tensor | None = None,
    obs_std: torch.Tensor | None = None,
) -> MlpActor:
    """Copy an MLP actor (Linear / activation layers in forward order, the last Linear giving the
    logits) into an :class:`MlpActor`, with optional observation standardisation (D,) stats.

    Raises ``ValueError`` on anything else (normalisation layers, dropout, mixed activations),
    because such a network cannot become SB3's ``MlpPolicy`` without changing what it computes.
    """
    linears: list[nn.Linear] = []
    acts: set[str] = set()
    names = {cls: name for name, cls in ACTIVATIONS.items()}
    for name, module in actor.named_modules():
        if list(module.children()):
            continue  # containers: only leaves compute
        if isinstance(module, nn.Linear):
            linears.append(module)
        elif type(module) in names:
            acts.add(names[type(module)])
        elif not isinstance(module, nn.Identity):
            raise ValueError(
                f"actor layer {name!r} ({type(module).__name__}) cannot be mapped onto an SB3 "
                "MlpPolicy; expected only Linear layers and one activation type"
            )
    if not linears:
        raise ValueError("actor has no Linear layer")
    if len(acts) > 1:
        raise ValueError(f"actor mixes activations {sorted(acts)}; SB3 uses one activation_fn")
    if len(linears) > 1 and not acts:
        raise ValueError(
            "actor has several Linear layers but no activation module (a functional activation "
            "in forward cannot be detected); expected e.g. nn.ReLU modules"
        )
    for a, b in zip(linears[:-1], linears[1:], strict=True):
        if a.out_features != b.in_features:
            raise ValueError(
                f"actor Linear layers are not a chain: {a.out_features} -> {b.in_features}"
            )
    if (obs_mean is None) != (obs_std is None):
        raise ValueError("give both obs_mean and obs_std, or neither")
    spec = ActorSpec(
        obs_dim=linears[0].in_features,
        hidden_sizes=tuple(lin.out_features for lin in linears[:-1]),
        activation=acts.pop() if acts else "relu",
        n_actions=linears[-1].out_features,
        standardize=obs_mean is not None,
    )
    out = MlpActor(spec)
    with torch.no_grad():
        targets = [m for m in out.hidden if isinstance(m, nn.Linear)] + [out.head]
        for src, dst in zip(linears, targets, strict=True):
            dst.weight.copy_(src.weight)
            dst.bias.copy_(src.bias)
        if obs_mean is not None and obs_std is not None:
            out.standardize.mean.copy_(torch.as_tensor(obs_mean).reshape(-1))
            out.standardize.std.copy_(torch.as_tensor(obs_std).reshape(-1))
    return out
