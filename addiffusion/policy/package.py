"""Policy packages: a trained policy as a folder that loads like any Hub model.

A package is what ``save_pretrained`` writes and ``from_pretrained`` reads (a local folder or a
Hub repo id, through ``huggingface_hub``'s :class:`~huggingface_hub.ModelHubMixin`)::

    config.json        PolicyConfig: algo, networks, the action table, the observation layout,
                       scorer, backbone (id and family), solver, sampler settings, reward
                       component stats, the training data and the eval numbers
    model.safetensors  the networks' weights (float32; no pickle anywhere)
    README.md          the model card (training data, eval numbers, intended backbone, usage)

Every algorithm becomes ``networks`` MLPs (:class:`~addiffusion.online_finetune.actor.MlpActor`,
each with its own observation standardisation) combined into one preference per action
(``combine``, :mod:`addiffusion.policy.combine`), and the greedy legal action is taken:

* ``combine: "mean"`` (the default; config.json files without the key): the networks' outputs
  are averaged. IQL and BC export their categorical policy (1 network: logits), PPO its actor
  (1 network: logits), CQL its Q ensemble (``n_critics`` networks: the mean Q, as d3rlpy's
  greedy action takes it).
* ``combine: "bcq"`` with ``action_flexibility`` (d3rlpy's ``DiscreteBCQConfig`` field): discrete
  BCQ, networks ``[imitator, q_1, ..., q_k]``; the greedy action is the kept action of highest
  mean Q, an action being kept when its imitator probability is more than
  ``action_flexibility`` times the most likely action's (:func:`~addiffusion.policy.combine.
  bcq_scores`).

The weights are copied layer for layer (no folding), so the package computes what the trained
policy computes. Two optional restrictions come from ablation runs:

* ``allowed_actions``: the action names the policy may take (null or absent: every action);
  :meth:`AdaptivePolicy.act` ANDs every mask with them (a row left with no action keeps its own
  mask).
* ``observation_drop``: the observation parts (:data:`~addiffusion.diffusion.mdp.
  OBSERVATION_PARTS`) the policy was trained without; :meth:`AdaptivePolicy.scores` zeroes those
  columns, and packages exported from a trained run also have their first layers ignore them.

config.json holds these four keys only when they differ from the defaults, so that a package
without them reads as before (and an older reader refuses exactly the packages it would run
wrongly, naming the unknown key).
"""

from __future__ import annotations

import dataclasses
import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from huggingface_hub import ModelCard, ModelHubMixin, hf_hub_download
from safetensors.torch import load_file, save_file
from torch import nn

from addiffusion.config import UserError
from addiffusion.diffusion.actions import ActionTable
from addiffusion.diffusion.mdp import OBSERVATION_PARTS, ObservationLayout, drop_parts
from addiffusion.online_finetune.actor import ActorSpec, MlpActor
from addiffusion.policy.combine import COMBINES, bcq_scores, restrict_mask_np

if TYPE_CHECKING:  # importing the sampler pulls in diffusers
    from addiffusion.diffusion.sampler import SamplerSettings

FORMAT = "addiffusion.policy"
VERSION = 1
WEIGHTS = "model.safetensors"
ALGOS = ("iql", "cql", "bc", "bcq", "ppo")
FAMILIES = ("sd", "sdxl", "sd3")


class PolicyPackageError(UserError, ValueError):
    """A package is malformed, or does not fit the pipeline it is used with."""


@dataclass(frozen=True)
class PolicyConfig:
    """``config.json`` of a package, read back strictly (see the module docstring)."""

    algo: str
    networks: tuple[ActorSpec, ...]
    actions: ActionTable
    observation: ObservationLayout
    scorer: str
    """open_clip scorer the observations' features come from (folder, ``hf-hub:`` or name)."""
    backbone: str
    """The pipeline the policy was trained on (folder or Hub id): the default for ``generate``."""
    family: str
    """``sd``, ``sdxl`` or ``sd3``: the backbone family a pipeline must have."""
    solver: str
    """The solver (``addiffusion.diffusion.backbone.SCHEDULERS`` name) the policy steers."""
    sampler: dict[str, Any]
    """``SamplerSettings`` as a mapping: grid, strides, warm-up, refine, guidance, size."""
    drop_components: tuple[str, ...] = ()
    """Pipeline parts the backbone was loaded without (e.g. SD3's T5)."""
    preview: str = ""
    """The preview decoder (``AutoencoderTiny`` folder or Hub id) of the observations when the
    sampler settings say ``observe_with: preview``; empty when they are the full VAE's."""
    component_stats: dict[str, dict[str, float]] = field(default_factory=dict)
    """Running mean / std of the reward components in the training data."""
    training: dict[str, Any] = field(default_factory=dict)
    """Where the policy came from (dataset, episode counts, behaviour policy), for the card."""
    evaluation: dict[str, Any] = field(default_factory=dict)
    """Its held-out eval numbers (NFE, scores, gain against the fixed-schedule frontier)."""
    combine: str = "mean"
    """How the networks' outputs become scores: ``mean`` or ``bcq`` (see the module docstring)."""
    action_flexibility: float | None = None
    """BCQ's imitator threshold (``combine == "bcq"`` only; None otherwise)."""
    allowed_actions: tuple[str, ...] | None = None
    """The action names the policy may take (exported packages list them in table order); None:
    every action."""
    observation_drop: tuple[str, ...] = ()
    """Observation parts the policy was trained without (zeroed before the networks)."""

    def __post_init__(self) -> None:
        # As config.json holds them (lists, not tuples), so that a loaded config equals its source.
        for name in ("sampler", "component_stats", "training", "evaluation"):
            object.__setattr__(self, name, json.loads(json.dumps(getattr(self, name))))
        if self.allowed_actions is not None:
            object.__setattr__(self, "allowed_actions", tuple(self.allowed_actions))
        object.__setattr__(self, "observation_drop", tuple(self.observation_drop))

    def settings(self) -> SamplerSettings:
        from addiffusion.task import sampler_settings

        return sampler_settings(self.sampler, "config.json 'sampler'")

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": FORMAT,
            "version": VERSION,
            "algo": self.algo,
            "networks": [n.to_dict() for n in self.networks],
            "actions": self.actions.to_dict(),
            "observation": self.observation.to_dict(),
            "scorer": self.scorer,
            "backbone": self.backbone,
            "family": self.family,
            "solver": self.solver,
            "sampler": self.sampler,
            "drop_components": list(self.drop_components),
            "preview": self.preview,
            "component_stats": self.component_stats,
            "training": self.training,
            "evaluation": self.evaluation,
            **self._optional(),
        }

    def _optional(self) -> dict[str, Any]:
        """The keys that old packages lack, only where they are not the defaults."""
        out: dict[str, Any] = {}
        if self.combine != "mean" or self.action_flexibility is not None:
            out["combine"] = self.combine
            out["action_flexibility"] = self.action_flexibility
        if self.allowed_actions is not None:
            out["allowed_actions"] = list(self.allowed_actions)
        if self.observation_drop:
            out["observation_drop"] = list(self.observation_drop)
        return out

    @classmethod
    def from_dict(cls, data: Any, where: str = "config.json") -> PolicyConfig:
        if not isinstance(data, dict):
            raise PolicyPackageError(f"{where} must hold a JSON object, got {data!r}")
        if data.get("format") != FORMAT or data.get("version") != VERSION:
            raise PolicyPackageError(
                f"{where} is not an addiffusion policy package: expected format {FORMAT!r} "
                f"version {VERSION}, got {data.get('format')!r} version {data.get('version')!r}"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names - {"format", "version"})
        if unknown:
            raise PolicyPackageError(f"{where}: unknown key {unknown[0]!r}")
        missing = [n for n in ("algo", "networks", "actions", "observation") if n not in data]
        missing += [
            n for n in ("scorer", "backbone", "family", "solver", "sampler") if n not in data
        ]
        if missing:
            raise PolicyPackageError(f"{where} has no {missing[0]!r} entry")
        try:
            nets = tuple(ActorSpec.from_dict(n) for n in data["networks"])
            layout = ObservationLayout.from_dict(data["observation"])
            table = ActionTable.from_dict(data["actions"], f"{where} 'actions'")
        except (KeyError, TypeError, ValueError) as e:
            raise PolicyPackageError(f"{where}: {e}") from e
        combine = data.get("combine", "mean")
        if not isinstance(combine, str):
            raise PolicyPackageError(f"{where}: combine must be a string, got {combine!r}")
        flex = data.get("action_flexibility")
        if flex is not None and (isinstance(flex, bool) or not isinstance(flex, int | float)):
            raise PolicyPackageError(
                f"{where}: action_flexibility must be a number or null, got {flex!r}"
            )
        allowed = _names(data.get("allowed_actions"), "allowed_actions", where, none_ok=True)
        dropped = _names(data.get("observation_drop", []), "observation_drop", where)
        cfg = cls(
            algo=str(data["algo"]),
            networks=nets,
            actions=table,
            observation=layout,
            scorer=str(data["scorer"]),
            backbone=str(data["backbone"]),
            family=str(data["family"]),
            solver=str(data["solver"]),
            sampler=dict(data["sampler"]),
            drop_components=tuple(str(c) for c in data.get("drop_components", ())),
            preview=str(data.get("preview", "")),
            component_stats=dict(data.get("component_stats", {})),
            training=dict(data.get("training", {})),
            evaluation=dict(data.get("evaluation", {})),
            combine=combine,
            action_flexibility=None if flex is None else float(flex),
            allowed_actions=allowed,
            observation_drop=dropped or (),
        )
        cfg.check(where)
        return cfg

    @property
    def allowed(self) -> np.ndarray:
        """``(n,)`` bool: the actions the policy may take (all True when unrestricted)."""
        if self.allowed_actions is None:
            return np.ones(self.actions.n, dtype=bool)
        return np.array([n in self.allowed_actions for n in self.actions.names])

    def check(self, where: str = "config.json") -> None:
        """Raise :class:`PolicyPackageError` on an inconsistent config."""
        from addiffusion.diffusion.backbone import SCHEDULERS

        problems = []
        if self.algo not in ALGOS:
            problems.append(f"algo must be one of {', '.join(ALGOS)}, got {self.algo!r}")
        if self.family not in FAMILIES:
            problems.append(f"family must be one of {', '.join(FAMILIES)}, got {self.family!r}")
        if self.solver not in SCHEDULERS:
            problems.append(f"solver must be one of {', '.join(SCHEDULERS)}, got {self.solver!r}")
        if not self.networks:
            problems.append("networks is empty")
        problems += self._combine_problems()
        problems += self._restriction_problems()
        for k, net in enumerate(self.networks):
            if net.obs_dim != self.observation.dim:
                problems.append(
                    f"networks[{k}] takes observations of dim {net.obs_dim}, but the observation "
                    f"layout has dim {self.observation.dim}"
                )
            if net.n_actions != self.actions.n:
                problems.append(
                    f"networks[{k}] has {net.n_actions} outputs, but the action table has "
                    f"{self.actions.n} actions ({list(self.actions.names)})"
                )
        try:
            settings = self.settings()
        except ValueError as e:
            problems.append(str(e))
        else:
            if settings.n_max != self.actions.n_max:
                problems.append(
                    f"sampler n_max {settings.n_max} != the action table's {self.actions.n_max}"
                )
            if (settings.observe_with == "preview") != bool(self.preview):
                problems.append(
                    f"sampler observe_with is {settings.observe_with!r} but preview is "
                    f"{self.preview!r} (a preview decoder is named exactly when it is used)"
                )
        if problems:
            raise PolicyPackageError(f"{where}: " + "; ".join(problems))

    def _combine_problems(self) -> list[str]:
        if self.combine not in COMBINES:
            return [f"combine must be one of {', '.join(COMBINES)}, got {self.combine!r}"]
        problems = []
        if (self.algo == "bcq") != (self.combine == "bcq"):
            problems.append(
                f"algo {self.algo!r} needs combine "
                f"{'bcq' if self.algo == 'bcq' else 'mean'!r}, got {self.combine!r}"
            )
        flex = self.action_flexibility
        if self.combine == "bcq":
            if flex is None or not math.isfinite(flex) or flex <= 0:
                problems.append(
                    f"combine 'bcq' needs action_flexibility, a number > 0, got {flex!r}"
                )
            if len(self.networks) < 2:
                problems.append(
                    f"combine 'bcq' needs networks [imitator, q_1, ...] (at least 2), got "
                    f"{len(self.networks)}"
                )
        elif flex is not None:
            problems.append(f"action_flexibility is BCQ's (combine 'bcq'), got {flex!r}")
        return problems

    def _restriction_problems(self) -> list[str]:
        problems = []
        if self.allowed_actions is not None:
            names = list(self.allowed_actions)
            unknown = [n for n in names if n not in self.actions.names]
            if unknown:
                problems.append(
                    f"allowed_actions: unknown action {unknown[0]!r} (the action table has "
                    f"{list(self.actions.names)})"
                )
            elif not names or len(set(names)) != len(names):
                problems.append(
                    f"allowed_actions must be distinct action names (null for every action), "
                    f"got {names}"
                )
        drop = list(self.observation_drop)
        unknown = [p for p in drop if p not in OBSERVATION_PARTS]
        if unknown:
            problems.append(
                f"observation_drop: unknown observation part {unknown[0]!r} (expected some of "
                f"{', '.join(OBSERVATION_PARTS)})"
            )
        elif len(set(drop)) != len(drop):
            problems.append(f"observation_drop names a part twice: {drop}")
        return problems


def _names(value: Any, key: str, where: str, none_ok: bool = False) -> tuple[str, ...] | None:
    """A config list of strings as a tuple (None stays None when ``none_ok``)."""
    if value is None and none_ok:
        return None
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        null = " (or null)" if none_ok else ""
        raise PolicyPackageError(f"{where}: {key} must be a list of names{null}, got {value!r}")
    return tuple(value)


class AdaptivePolicy(
    nn.Module,
    ModelHubMixin,
    library_name="addiffusion",
    tags=["diffusion", "adaptive-sampling", "reinforcement-learning", "addiffusion"],
):
    """A trained schedule policy: ``act(obs (B, D) float32, mask (B, n) bool) -> (B,) int64``.

    Build one with :func:`addiffusion.policy.export.package_policy` (from an offline-rl or
    online-finetune run), or load one with ``AdaptivePolicy.from_pretrained(folder_or_hub_id)``;
    ``save_pretrained(folder)`` / ``push_to_hub(repo_id)`` write it. Use it with
    :class:`addiffusion.policy.AdaptiveDiffusionPipeline`.
    """

    def __init__(self, config: dict[str, Any]) -> None:
        super().__init__()
        self.config = PolicyConfig.from_dict(config)
        self.networks = nn.ModuleList(MlpActor(spec) for spec in self.config.networks)
        self.eval()

    @property
    def actions(self) -> ActionTable:
        return self.config.actions

    @property
    def obs_dim(self) -> int:
        return self.config.observation.dim

    @property
    def allowed(self) -> np.ndarray:
        """``(n,)`` bool: the actions the policy may take (config ``allowed_actions``)."""
        return self.config.allowed

    @torch.no_grad()
    def scores(self, obs: np.ndarray) -> np.ndarray:
        """``(B, D) -> (B, n)`` float32 preference per action: the mean over the networks
        (``combine: mean``) or BCQ's scores (``combine: bcq``: mean Q where the imitator keeps
        the action, below every kept action where it does not). The columns of
        ``observation_drop`` are zeroed first. Ignores ``allowed_actions`` (:meth:`act`
        applies it)."""
        x = np.asarray(obs, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.obs_dim:
            raise ValueError(
                f"obs must have shape (B, {self.obs_dim}) (the policy's observation dim), got "
                f"{x.shape}"
            )
        cfg = self.config
        x = drop_parts(x, cfg.observation, cfg.observation_drop)
        t = torch.from_numpy(x).to(next(self.parameters()).device)
        if cfg.combine == "bcq":
            assert cfg.action_flexibility is not None
            log_probs = torch.log_softmax(self.networks[0](t), dim=1)
            q = torch.stack([net(t) for net in self.networks[1:]]).mean(dim=0)
            out = bcq_scores(log_probs, q, cfg.action_flexibility)
        else:
            out = torch.stack([net(t) for net in self.networks]).mean(dim=0)
        return out.cpu().numpy().astype(np.float32)

    def act(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        """Greedy legal action: ``obs (B, D) float32, mask (B, n) bool -> (B,) int64``.

        Only actions in ``mask`` AND :attr:`allowed` are taken; a row that leaves empty keeps its
        own mask (the ablations' action spaces all hold jump-1 and stop, so it does not happen
        with masks from the action table)."""
        mask = np.asarray(mask)
        scores = self.scores(obs)
        if mask.dtype != np.bool_ or mask.shape != scores.shape:
            raise ValueError(
                f"mask must be bool of shape {scores.shape}, got {mask.dtype} {mask.shape}"
            )
        empty = np.flatnonzero(~mask.any(axis=1))
        if empty.size:
            raise ValueError(f"mask rows {empty[:10].tolist()} allow no action at all")
        if self.config.allowed_actions is not None:
            mask = restrict_mask_np(mask, self.allowed)
        return np.where(mask, scores, -np.inf).argmax(axis=1).astype(np.int64)

    # --- Hub mixin: safetensors only, loaded strictly -------------------------------------------
    def _save_pretrained(self, save_directory: Path) -> None:
        state = {k: v.detach().cpu().contiguous() for k, v in self.state_dict().items()}
        save_file(state, str(Path(save_directory) / WEIGHTS), metadata={"format": "pt"})
        (Path(save_directory) / "config.json").write_text(
            json.dumps(self.config.to_dict(), indent=2) + "\n"
        )

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision: str | None,
        cache_dir: str | Path | None,
        force_download: bool,
        local_files_only: bool,
        token: str | bool | None,
        config: dict[str, Any] | None = None,
        map_location: str = "cpu",
        **kwargs: Any,
    ) -> AdaptivePolicy:
        if config is None:
            raise PolicyPackageError(
                f"{model_id} has no config.json: not an addiffusion policy package (write one "
                "with `addiffusion policy export` or AdaptivePolicy.save_pretrained)"
            )
        if Path(model_id).is_dir():
            weights = Path(model_id) / WEIGHTS
            if not weights.is_file():
                raise PolicyPackageError(f"{weights} not found: the package has no weights")
        else:
            weights = Path(
                hf_hub_download(
                    repo_id=model_id,
                    filename=WEIGHTS,
                    revision=revision,
                    cache_dir=cache_dir,
                    force_download=force_download,
                    token=token,
                    local_files_only=local_files_only,
                )
            )
        policy = cls(config)
        state = load_file(str(weights), device=map_location)
        expected = policy.state_dict()
        missing = sorted(set(expected) - set(state))
        extra = sorted(set(state) - set(expected))
        if missing or extra:
            raise PolicyPackageError(
                f"{weights} does not match config.json's networks: missing {missing[:5]}, "
                f"unexpected {extra[:5]}"
            )
        for key, value in state.items():
            if value.shape != expected[key].shape:
                raise PolicyPackageError(
                    f"{weights}: {key} has shape {tuple(value.shape)}, config.json's networks "
                    f"need {tuple(expected[key].shape)}"
                )
        policy.load_state_dict(state, strict=True)
        return policy.to(map_location).eval()

    def generate_model_card(self, *args: Any, **kwargs: Any) -> ModelCard:
        from addiffusion.policy.card import model_card

        return model_card(self.config)


def networks_state(networks: list[MlpActor]) -> dict[str, torch.Tensor]:
    """The state dict an :class:`AdaptivePolicy` with these networks has."""
    return {
        f"networks.{k}.{name}": v
        for k, net in enumerate(networks)
        for name, v in net.state_dict().items()
    }


def build_policy(config: PolicyConfig, networks: list[MlpActor]) -> AdaptivePolicy:
    """An :class:`AdaptivePolicy` holding copies of ``networks`` (their specs must be the
    config's)."""
    specs = tuple(net.spec for net in networks)
    if specs != config.networks:
        raise PolicyPackageError(f"networks {specs} do not match the config's {config.networks}")
    policy = AdaptivePolicy(config.to_dict())
    policy.load_state_dict(networks_state(networks), strict=True)
    return policy.eval()
