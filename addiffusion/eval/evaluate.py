"""Evaluate fixed-step baselines, heuristics and learned policies on the held-out prompts.

1. read the held-out (prompt, seed) pairs, sampler settings and stats from the dataset;
2. load the dataset's backbone, scheduler and CLIP scorer (+ the shapes verifier when the
   dataset has that component);
3. run every method on every pair: fixed-step ``<scheduler>-<k>`` samplers (k-step schedule, NFE
   = k), then heuristics and policies on the dataset's ``n_max`` schedule with its masks;
4. score the final images (CLIP score, verifier, reward-defined quality Q), summarise per method
   and per category, compare each non-baseline method with the baseline of closest mean NFE;
5. write metrics.json, pareto.csv, pareto.png, samples.png and report.md into ``out_dir``.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from addiffusion.diffusion.backbone import load_pipeline, resolve_device
from addiffusion.diffusion.mdp import ObservationLayout
from addiffusion.diffusion.sampler import StepwiseSampler
from addiffusion.eval import report
from addiffusion.eval.config import EvalConfig
from addiffusion.eval.heldout import HeldoutSet, load_heldout
from addiffusion.eval.metrics import closest_baseline, compare, summarize
from addiffusion.eval.policies import ClipDeltaStop, Policy, StabilityStop
from addiffusion.eval.rollout import ALWAYS_CONTINUE, MethodRun, run_method
from addiffusion.rewards.clip import ClipScorer
from addiffusion.rewards.config import RewardConfig
from addiffusion.rewards.extra import build_extra_scorers
from addiffusion.rewards.reward import quality

OUTPUTS = ("metrics.json", "pareto.csv", "pareto.png", "samples.png", "report.md")


def _check_observation_layout(held: HeldoutSet, scorer: ClipScorer) -> None:
    """Policies were trained on the dataset's observations: evaluation must build the same."""
    recorded = held.info.get("observation")
    if recorded is None:
        return
    here = ObservationLayout(scorer.dim, scorer.dim)
    if ObservationLayout.from_dict(recorded) != here:
        raise ValueError(
            f"meta/info.json records observation layout {recorded}, but scorer "
            f"{held.info['scorer']!r} gives {here.to_dict()}: evaluate with the scorer the "
            "dataset was collected with"
        )


def _scores(run: MethodRun, reward_cfg: RewardConfig, held: HeldoutSet) -> dict[str, np.ndarray]:
    """Per-item scores of the final images: CLIP score, verifier (if any), quality Q."""
    out = {"clip_score": run.components["clip_score"]}
    if "verifier" in run.components:
        out["verifier"] = run.components["verifier"]
    stats = held.stats if reward_cfg.normalize else None
    if reward_cfg.normalize and not held.stats:
        raise ValueError(
            "rewards.normalize is true but the dataset's meta/info.json has no normalisation "
            "stats; rebuild the dataset or set rewards.normalize: false"
        )
    out["quality"] = quality(run.components, reward_cfg, stats)
    return out


def _methods(cfg: EvalConfig, policies: Mapping[str, Policy]) -> list[tuple[str, str, Policy]]:
    """(name, kind, policy) of the methods on the n_max schedule."""
    methods: list[tuple[str, str, Policy]] = []
    methods += [
        (f"stability>={x:g}", "heuristic", StabilityStop(x)) for x in cfg.stability_thresholds
    ]
    methods += [
        (f"clip-delta<{x:g}", "heuristic", ClipDeltaStop(x)) for x in cfg.clip_delta_thresholds
    ]
    for name, policy in policies.items():
        if not callable(getattr(policy, "act", None)):
            raise TypeError(f"policy {name!r} has no act(obs, mask) method")
        methods.append((name, "policy", policy))
    names = [m[0] for m in methods]
    dup = sorted({n for n in names if names.count(n) > 1})
    if dup:
        raise ValueError(f"method names must be unique, got {dup[0]!r} twice")
    return methods


def evaluate(
    dataset_dir: Path,
    policies: Mapping[str, Policy],
    cfg: EvalConfig,
    reward_cfg: RewardConfig,
    out_dir: Path,
    progress: bool = True,
) -> dict[str, Any]:
    """Run every method on the held-out pairs and write the outputs into ``out_dir``.

    Returns the metrics written to ``metrics.json``: ``{method: {"kind", "nfe", "nfe_std",
    "clip_score", "quality", ["verifier", "verifier_acc"], "refines", "masked_actions",
    "by_category", and for heuristics and policies "vs", "nfe_diff", "<score>_diff",
    "<score>_ci_low", "<score>_ci_high", "<score>_p"}}`` (means over the (prompt, seed) pairs;
    ``<score>_std`` beside each score).
    """
    torch.manual_seed(cfg.seed)
    out_dir = Path(out_dir)
    held = load_heldout(Path(dataset_dir), cfg)
    settings = held.sampler
    too_long = [k for k in cfg.baseline_steps if k > 1000]
    if too_long:
        raise ValueError(f"eval.baseline_steps {too_long} exceed the backbone's 1000 train steps")
    methods = _methods(cfg, policies)

    device = resolve_device(cfg.device)
    # Loaded exactly as the collector loaded it (components it dropped stay dropped).
    pipe = load_pipeline(
        held.info["backbone"],
        held.info["scheduler"],
        str(device),
        drop_components=tuple(held.info.get("drop_components", ())),
    )
    scorer = ClipScorer(held.info["scorer"], device)
    _check_observation_layout(held, scorer)
    # Every extra component the dataset recorded, so Q is defined the same way.
    extra = build_extra_scorers(held.components, held.info.get("extra_scorer_models", {}), device)
    prompts = [it.prompt for it in held.items]
    seeds = [it.seed for it in held.items]
    n_methods = len(cfg.baseline_steps) + len(methods)
    bar = tqdm(total=n_methods * len(prompts), unit="image", disable=not progress, desc="eval")

    runs: dict[str, tuple[str, MethodRun]] = {}
    for k in sorted(cfg.baseline_steps):
        # A k-step schedule of the same solver, always continued: no warm-up or refine applies.
        base = dataclasses.replace(settings, n_max=k, warmup=0, refine_budget=0)
        sampler = StepwiseSampler(pipe, scorer, base, extra)
        name = f"{held.info['scheduler']}-{k}"
        bar.set_postfix_str(name)
        runs[name] = (
            "baseline",
            run_method(sampler, ALWAYS_CONTINUE, prompts, seeds, cfg.batch_size, name, bar.update),
        )
    sampler = StepwiseSampler(pipe, scorer, settings, extra)
    for name, kind, policy in methods:
        bar.set_postfix_str(name)
        runs[name] = (
            kind,
            run_method(sampler, policy, prompts, seeds, cfg.batch_size, name, bar.update),
        )
    bar.close()

    # Summaries, then paired comparisons against the baseline of closest mean NFE.
    categories = [it.category for it in held.items]
    groups = np.array([it.prompt_id for it in held.items])
    scores = {name: _scores(run, reward_cfg, held) for name, (_, run) in runs.items()}
    metrics: dict[str, dict[str, Any]] = {}
    for name, (kind, run) in runs.items():
        m: dict[str, Any] = {"kind": kind}
        m.update(summarize(run.nfe, scores[name], categories))
        m["refines"] = float(run.refines.mean())
        m["masked_actions"] = run.masked_actions
        metrics[name] = m
    base_nfe = {n: m["nfe"] for n, m in metrics.items() if m["kind"] == "baseline"}
    for name, m in metrics.items():
        if m["kind"] == "baseline":
            continue
        ref = closest_baseline(m["nfe"], base_nfe)
        paired = {"nfe": runs[name][1].nfe, **scores[name]}
        ref_scores = {"nfe": runs[ref][1].nfe, **scores[ref]}
        m["vs"] = ref
        m.update(
            compare(paired, ref_scores, groups, cfg.bootstrap_samples, cfg.confidence, cfg.seed)
        )

    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_metrics(metrics, out_dir / "metrics.json")
    report.write_pareto_csv(metrics, out_dir / "pareto.csv")
    report.plot_pareto(metrics, out_dir / "pareto.png", settings.n_max)
    report.plot_samples(
        {n: r.images for n, (_, r) in runs.items()}, prompts, out_dir / "samples.png"
    )
    context = {
        "dataset": str(dataset_dir),
        "backbone": held.info["backbone"],
        "scheduler": held.info["scheduler"],
        "scorer": held.info["scorer"],
        "n_max": settings.n_max,
        "warmup": settings.warmup,
        "held-out prompts": len(set(groups.tolist())),
        "seeds per prompt": cfg.seeds_per_prompt,
        "images per method": len(prompts),
        "reward": f"weights {dict(reward_cfg.weights)}, normalize {reward_cfg.normalize}",
        "device": str(device),
        "seconds": {n: r.seconds / max(len(prompts), 1) for n, (_, r) in runs.items()},
    }
    report.write_report(metrics, context, out_dir / "report.md")
    return metrics
