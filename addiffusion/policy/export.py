"""Turn a trained policy (offline-rl's IQL / CQL / BC / BCQ, online-finetune's PPO, from the
offline actor or from scratch) into a package.

The ``.d3`` files are unpickled only through :func:`addiffusion.offline_rl.load_policy`, which
checks their sha256 against the manifest their training run wrote. The package's networks are
checked against the loaded policy on observations near the training data before anything is
written: a package that would act differently from the policy it came from is never saved. An
offline run's or a PPO actor's ``allowed_actions`` and ``observation_drop`` (its manifest's) go
into the package's config, and its networks are exported ignoring the dropped observation columns.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from addiffusion.online_finetune.actor import MlpActor, mlp_actor_from_module
from addiffusion.policy.package import (
    AdaptivePolicy,
    PolicyConfig,
    PolicyPackageError,
    build_policy,
)
from addiffusion.task import Task, read_task

ONLINE_RUNS = {"ppo": ".", "ppo-scratch": "scratch"}
"""Eval's names of an online-finetune run's actors -> their folder in the run (PPO from the
offline actor: the run's own folder; from scratch: ``finetune.SCRATCH_DIR``)."""
METHODS = ("iql", "cql", "bc", "bcq", *ONLINE_RUNS)
"""What ``export_policy`` packages (``--method``)."""


def task_config(
    task: Task,
    algo: str,
    networks: list[MlpActor],
    training: dict[str, Any] | None = None,
    evaluation: dict[str, Any] | None = None,
    *,
    combine: str = "mean",
    action_flexibility: float | None = None,
    allowed_actions: tuple[str, ...] | None = None,
    observation_drop: tuple[str, ...] = (),
) -> PolicyConfig:
    """The package config of a policy trained on ``task`` (a dataset's MDP); the keyword
    arguments are :class:`PolicyConfig`'s fields of the same names."""
    family = task.info.get("family")
    if task.observation is None or family is None:
        raise PolicyPackageError(
            "the dataset's meta/info.json records no observation layout or backbone family; "
            "rebuild it with this version (`addiffusion collect` + `datasets build`)"
        )
    counts = task.info.get("counts", {})
    behaviour = task.info.get("behavior_policy", {})
    cfg = PolicyConfig(
        algo=algo,
        networks=tuple(net.spec for net in networks),
        actions=task.actions,
        observation=task.observation,
        scorer=task.scorer,
        backbone=task.backbone,
        family=str(family),
        solver=task.scheduler,
        sampler=dataclasses.asdict(task.settings),
        drop_components=tuple(task.drop_components),
        preview=task.preview,
        component_stats=task.component_stats,
        training={
            "episodes": counts.get("episodes"),
            "root_episodes": counts.get("root_episodes"),
            "steps": counts.get("steps"),
            "behavior_policy": behaviour.get("description"),
            "components": list(task.components),
            **(training or {}),
        },
        evaluation=dict(evaluation or {}),
        combine=combine,
        action_flexibility=action_flexibility,
        allowed_actions=allowed_actions,
        observation_drop=observation_drop,
    )
    cfg.check("the exported config")
    return cfg


def _copy_mlp(
    modules: list[nn.Module],
    mean: torch.Tensor | None,
    scale: torch.Tensor | None,
    keep: np.ndarray | None = None,
) -> MlpActor:
    net = mlp_actor_from_module(nn.Sequential(*copy.deepcopy(modules)).cpu().float(), mean, scale)
    if keep is not None and not keep.all():
        _ignore_columns(net, ~keep)
    return net


def _ignore_columns(net: MlpActor, drop: np.ndarray) -> None:
    """Make ``net`` compute, for any input, what it computes with the ``drop`` (D,) columns at
    zero: their standardised value ``-mean / std`` goes into the first Linear's bias, and their
    weights become zero."""
    first = net.hidden[0] if len(net.hidden) else net.head
    assert isinstance(first, nn.Linear)
    cols = torch.as_tensor(drop)
    with torch.no_grad():
        if net.spec.standardize:
            zero = -net.standardize.mean[cols] / net.standardize.std[cols]
            first.bias.add_(first.weight[:, cols] @ zero)
        first.weight[:, cols] = 0.0


def offline_networks(policy: Any) -> list[MlpActor]:
    """The networks of an ``OfflinePolicy`` (IQL / BC: the categorical policy; CQL: every Q
    function; BCQ: the imitator, then every Q function), each with d3rlpy's observation
    standardisation ``(x - mean) / (std + eps)``, and ignoring the policy's dropped observation
    columns (its ``observation_drop``)."""
    from addiffusion.offline_rl.policy import _categorical_policy

    impl = policy.algo.impl
    scaler = policy.algo.observation_scaler
    mean = scale = None
    if scaler is not None:
        if scaler.get_type() != "standard":
            raise PolicyPackageError(f"cannot export observation scaler {scaler.get_type()!r}")
        mean = torch.as_tensor(np.asarray(scaler.mean), dtype=torch.float32).reshape(-1)
        scale = torch.as_tensor(np.asarray(scaler.std), dtype=torch.float32).reshape(-1)
        scale = scale + float(scaler.eps)
    if policy.algo_name == "cql":
        heads = list(impl.modules.q_funcs)
    elif policy.algo_name == "bcq":
        heads = [_categorical_policy(policy), *impl.modules.q_funcs]
    else:
        heads = [_categorical_policy(policy)]
    keep = np.asarray(policy.keep_columns, dtype=bool)
    return [_copy_mlp([*h._encoder._layers, h._fc], mean, scale, keep) for h in heads]


def _probe(
    dim: int, mean: np.ndarray | None, scale: np.ndarray | None, drop: np.ndarray | None = None
) -> np.ndarray:
    """256 observations near the training data (``mean + N(0, 1) scale``); the ``drop`` (D,)
    columns, which the policy ignores, get arbitrary values (N(0, 5)) to check that it does."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((256, dim)).astype(np.float32)
    out = x if mean is None or scale is None else (mean + x * scale).astype(np.float32)
    if drop is not None and drop.any():
        out[:, drop] = 5.0 * rng.standard_normal((256, int(drop.sum()))).astype(np.float32)
    return out


def _check_same(
    theirs: np.ndarray, ours: np.ndarray, where: str, what: str = "", shift: bool = True
) -> None:
    """Raise unless ``ours`` equals ``theirs`` (B, n) within float tolerance; ``shift``: up to a
    constant per row (d3rlpy's Categorical normalises logits). ``what`` names the part compared."""
    a, b = theirs, ours
    if shift:
        a = theirs - theirs.mean(axis=1, keepdims=True)
        b = ours - ours.mean(axis=1, keepdims=True)
    err = float(np.abs(a - b).max())
    if not err <= 1e-4 * max(1.0, float(np.abs(a).max())):
        raise PolicyPackageError(
            f"the package built from {where} differs from it{what} by {err:.3g}"
        )


def _check_bcq(policy: Any, package: AdaptivePolicy, probe: np.ndarray, where: str) -> None:
    """A BCQ package against its policy: the imitator's log-probabilities and the mean Q within
    float tolerance, and the greedy actions (every action legal) equal except on rows where a
    rounding error may decide (an imitator ratio at the threshold, or a near tie in Q)."""
    log_probs, q = policy.bcq_parts(probe)
    x = torch.from_numpy(policy.drop(probe))
    with torch.no_grad():
        ours_lp = torch.log_softmax(package.networks[0](x), dim=1).numpy()
        ours_q = torch.stack([net(x) for net in package.networks[1:]]).mean(dim=0).numpy()
    _check_same(log_probs, ours_lp, where, " (imitator)")
    _check_same(q, ours_q, where, " (mean Q)", shift=False)
    theirs = policy.scores(probe)
    theirs_a, ours_a = theirs.argmax(axis=1), package.scores(probe).argmax(axis=1)
    ratio = log_probs - log_probs.max(axis=1, keepdims=True)
    edge = (np.abs(ratio - np.log(policy.action_flexibility)) < 1e-3).any(axis=1)
    top = np.sort(theirs, axis=1)[:, -2:]
    tie = top[:, 1] - top[:, 0] < 1e-3 * max(1.0, float(np.abs(q).max()))
    bad = np.flatnonzero((theirs_a != ours_a) & ~edge & ~tie)
    if bad.size:
        raise PolicyPackageError(
            f"the package built from {where} acts differently from it on {bad.size} of "
            f"{len(probe)} probe observations"
        )


def package_offline(
    offline_dir: Path, task: Task, algo: str | None = None, **info: Any
) -> AdaptivePolicy:
    """Package ``offline_dir``'s main policy (``algo`` None or its own) or its baseline
    ``baselines/<algo>``; ``info``: ``training`` / ``evaluation`` extras for the card.

    The run's manifest's ``allowed_actions`` (None when it allows every action) and
    ``observation_drop`` go into the config; its ``observation`` layout, when recorded, must be
    the dataset's."""
    from addiffusion.offline_rl.policy import load_policy
    from addiffusion.online_finetune.offline_init import check_action_table

    offline_dir = Path(offline_dir)
    manifest = json.loads((offline_dir / "manifest.json").read_text())
    run = offline_dir if algo in (None, manifest.get("algo")) else offline_dir / "baselines" / algo
    policy = load_policy(run / "policy.d3", run / "manifest.json", device="cpu:0")
    check_action_table(policy.manifest, task.actions, run / "manifest.json")
    if policy.observation is not None and policy.observation != task.observation:
        raise PolicyPackageError(
            f"{run / 'manifest.json'} records the observation layout {policy.observation}, but "
            f"the dataset's is {task.observation}: package it with the dataset it was trained on"
        )
    networks = offline_networks(policy)
    allowed = policy.allowed_actions
    bcq = policy.algo_name == "bcq"
    cfg = task_config(
        task,
        policy.algo_name,
        networks,
        **info,
        combine="bcq" if bcq else "mean",
        action_flexibility=policy.action_flexibility if bcq else None,
        allowed_actions=None if allowed is None or len(allowed) == task.actions.n else allowed,
        observation_drop=policy.observation_drop,
    )
    package = build_policy(cfg, networks)
    std = networks[0].standardize
    probe = _probe(
        package.obs_dim,
        std.mean.numpy() if networks[0].spec.standardize else None,
        std.std.numpy() if networks[0].spec.standardize else None,
        ~policy.keep_columns,
    )
    where = str(run / "policy.d3")
    if bcq:
        _check_bcq(policy, package, probe, where)
    else:
        _check_same(policy.scores(probe), package.scores(probe), where)
    # The networks alone ignore the dropped columns (not only the package's scores).
    if policy.observation_drop:
        x = torch.from_numpy(probe)
        with torch.no_grad():
            for k, net in enumerate(package.networks):
                theirs = net(torch.from_numpy(policy.drop(probe))).numpy()
                _check_same(theirs, net(x).numpy(), where, f" (network {k}, dropped columns)")
    if not np.array_equal(package.allowed, policy.allowed):
        raise PolicyPackageError(
            f"the package built from {where} allows {package.config.allowed_actions}, the policy "
            f"{policy.allowed_actions}"
        )
    return package


def package_finetuned(online_dir: Path, task: Task, **info: Any) -> AdaptivePolicy:
    """Package a PPO actor folder of an online-finetune run (``<online>`` or ``<online>/scratch``;
    sha256-checked by its loader); ``info``: ``training`` / ``evaluation`` extras for the card.

    The actor manifest's ``allowed_actions`` (None when it allows every action) and
    ``observation_drop``, the ablation PPO trained under, go into the config, its network
    ignoring the dropped columns; its ``observation`` layout, when recorded, must be the
    dataset's. The package is checked to compute the actor's logits and allow its actions."""
    from addiffusion.online_finetune.ablation import Ablation
    from addiffusion.online_finetune.offline_init import check_action_table
    from addiffusion.online_finetune.ppo import load_finetuned_policy

    online_dir = Path(online_dir)
    where = online_dir / "manifest.json"
    ppo = load_finetuned_policy(online_dir)
    check_action_table(ppo.manifest, task.actions, where)
    ablation = Ablation.from_manifest(ppo.manifest, task.actions, str(where))
    if ablation.observation is not None and ablation.observation != task.observation:
        raise PolicyPackageError(
            f"{where} records the observation layout {ablation.observation}, but the dataset's "
            f"is {task.observation}: package it with the dataset it was trained on"
        )
    keep = ablation.keep()
    actor = copy.deepcopy(ppo.actor).cpu().float()
    if keep is not None:
        _ignore_columns(actor, ~keep)
    # How the actor started (offline actor or fresh), where the manifest says: the package's
    # algo is ppo either way.
    origin = {k: ppo.manifest[k] for k in ("init", "offline_algo", "seed") if k in ppo.manifest}
    training = {**origin, **(info.pop("training", None) or {})}
    allowed = ablation.allowed_actions
    cfg = task_config(
        task,
        "ppo",
        [actor],
        training,
        **info,
        allowed_actions=None if allowed is None or len(allowed) == task.actions.n else allowed,
        observation_drop=ablation.observation_drop,
    )
    package = build_policy(cfg, [actor])
    spec = actor.spec
    std = actor.standardize
    probe = _probe(
        package.obs_dim,
        std.mean.numpy() if spec.standardize else None,
        std.std.numpy() if spec.standardize else None,
        None if keep is None else ~keep,
    )
    _check_same(ppo.logits(probe), package.scores(probe), str(where), shift=False)
    if keep is not None:  # the network alone ignores the dropped columns too
        x = torch.from_numpy(probe)
        with torch.no_grad():
            theirs = actor(torch.from_numpy(np.where(keep, probe, np.float32(0.0)))).numpy()
            _check_same(theirs, actor(x).numpy(), str(where), " (dropped columns)", shift=False)
    theirs_allowed = np.ones(task.actions.n, bool) if ppo.allowed is None else ppo.allowed
    if not np.array_equal(package.allowed, theirs_allowed):
        raise PolicyPackageError(
            f"the package built from {where} allows {package.config.allowed_actions}, the actor "
            f"{ablation.allowed_actions}"
        )
    return package


def _evaluation(metrics: dict[str, Any], method: str, where: Path) -> dict[str, Any]:
    if method not in metrics:
        learned = [
            n for n, m in metrics.items() if isinstance(m, dict) and m.get("kind") == "policy"
        ]
        raise PolicyPackageError(f"{where} has no results for {method!r} (policies: {learned})")
    m = metrics[method]
    summary = metrics.get("frontier", {})
    keep = (
        "nfe",
        "nfe_std",
        "verifier",
        "verifier_acc",
        "clip_score",
        "quality",
        "seconds_per_image",
        "stopped_early",
        "vs",
    )
    out: dict[str, Any] = {k: m[k] for k in keep if k in m}
    if isinstance(m.get("frontier"), dict):
        out["frontier"] = {
            k: m["frontier"][k] for k in ("metric", "frontier", "gain", "ci") if k in m["frontier"]
        }
    out["metric"] = summary.get("metric")
    out["best_learned_line"] = summary.get("line")
    return out


def export_policy(
    dataset_dir: Path,
    out_dir: Path,
    offline_dir: Path | None = None,
    online_dir: Path | None = None,
    eval_dir: Path | None = None,
    method: str | None = None,
) -> tuple[str, AdaptivePolicy]:
    """Package ``method`` (default: the best learned policy of ``eval_dir/metrics.json``) into
    ``out_dir``; returns the method and the package. ``out_dir`` is replaced only once the new
    package is complete."""
    task = read_task(Path(dataset_dir))
    metrics: dict[str, Any] = {}
    if eval_dir is not None:
        path = Path(eval_dir) / "metrics.json"
        if not path.is_file():
            raise FileNotFoundError(f"{path} not found: run `addiffusion eval` first")
        metrics = json.loads(path.read_text())
    if method is None:
        method = metrics.get("frontier", {}).get("method")
        if method is None:
            raise PolicyPackageError(
                "no method given and the eval metrics name no best learned policy "
                f"(pass --method {'|'.join(METHODS)}, or --eval with an eval that ran "
                "policies)"
            )
    info: dict[str, Any] = {"training": {"dataset": str(dataset_dir)}}
    if metrics:
        info["evaluation"] = _evaluation(metrics, method, Path(eval_dir) / "metrics.json")
    if method in ONLINE_RUNS:
        if online_dir is None:
            raise PolicyPackageError(
                f"method {method} needs --online (an online-finetune output folder)"
            )
        run = Path(online_dir) / ONLINE_RUNS[method]
        if not (run / "manifest.json").is_file():
            what = (
                "PPO from scratch (online_finetune.from_scratch)"
                if run != Path(online_dir)
                else "actor"
            )
            raise PolicyPackageError(
                f"{run / 'manifest.json'} not found: method {method} needs the online-finetune "
                f"run's {what} (--online {online_dir})"
            )
        package = package_finetuned(run, task, **info)
    else:
        if offline_dir is None:
            raise PolicyPackageError(
                f"method {method} needs --offline (an offline-rl output folder)"
            )
        package = package_offline(Path(offline_dir), task, method, **info)
    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    package.save_pretrained(tmp)
    old = out_dir.parent / f".{out_dir.name}.old-{os.getpid()}"
    if out_dir.exists():
        os.rename(out_dir, old)
    os.rename(tmp, out_dir)
    shutil.rmtree(old, ignore_errors=True)
    return method, package
