"""Evaluate fixed schedules, heuristics and learned policies on the held-out prompts.

1. read the held-out (prompt, seed) pairs and the dataset's task (:func:`addiffusion.task.read_task`);
2. build the dataset's sampler (:func:`addiffusion.task.task_sampler`: backbone, CLIP scorer and
   every extra scorer it recorded, so Q is defined the same way);
3. run every method on every pair. The baselines (:func:`run_baselines`): fixed schedules
   ``<solver>-<k>`` for every solver of ``eval.solvers`` and k of ``eval.baseline_steps`` (a
   k-point grid run to the end, NFE = k; ``<solver>-ays-<k>`` on the Align-Your-Steps-style grid
   when ``eval.grids`` has ``ays``), best-of-N seeds picked by CLIP score, a random-stride policy
   and stop heuristics on the dataset's grid with its action table and masks, AdaptiveDiffusion
   on the dataset's grid plus a reuse action; then the learned policies (and their checkpoints)
   on the dataset's grid;
4. score the final images (CLIP score, verifier, reward-defined quality Q), summarise per method
   and per category, compare each method with the fixed schedule of closest NFE and with the
   all-solver fixed-schedule frontier (:mod:`addiffusion.eval.frontier`);
5. write metrics.json, pareto.csv, items.parquet, pareto.png, samples.png and report.md into
   ``out_dir``; the last line printed by the CLI is the ``frontier:`` line of the best learned
   policy.

The baselines do not depend on the learned policies, the rewards or the bootstrap, so they can be
computed once: ``addiffusion eval baselines`` (the ``eval_baselines`` stage) runs
:func:`run_baselines` and stores the runs (:mod:`addiffusion.eval.baselines`), and ``addiffusion
eval --baselines <dir>`` (:func:`evaluate` with ``baselines``) uses them instead of running step
3's baselines again, after checking that they were computed for this dataset, these held-out pairs
and these ``eval`` keys (:data:`addiffusion.eval.baselines.BASELINE_KEYS`). Both ways run the same
code, from the same seeds: the outputs are the same.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from addiffusion.diffusion.mdp import ObservationLayout
from addiffusion.diffusion.sampler import StepwiseSampler
from addiffusion.eval import frontier, report
from addiffusion.eval.baselines import BaselineRun, BaselineRuns, fingerprint
from addiffusion.eval.config import EvalConfig
from addiffusion.eval.heldout import HeldoutSet, load_heldout
from addiffusion.eval.learned import (
    SEED_SEP,
    CheckpointRun,
    checkpoint_report,
    episode_return,
    mean_ci,
    pair_comparisons,
    seed_summary,
)
from addiffusion.eval.metrics import closest_baseline, compare, summarize
from addiffusion.eval.policies import (
    AdaptiveDiffusionSkip,
    ClipDeltaStop,
    EpisodicPolicy,
    FixedSchedule,
    PatienceStop,
    Policy,
    ProgressStride,
    RandomStride,
    StabilityStop,
)
from addiffusion.eval.rollout import MethodRun, run_method
from addiffusion.rewards.config import RewardConfig
from addiffusion.rewards.reward import quality
from addiffusion.task import Task, check_observer, task_sampler

Checkpoint = tuple[int, "Policy | None", "float | None"]
"""(step, policy, FQE value) of one point along a learned method's training; policy None: the
method's own (final) policy."""

OUTPUTS = (
    "metrics.json",
    "pareto.csv",
    "items.parquet",
    "pareto.png",
    "samples.png",
    "report.md",
)


def _check_observation_layout(task: Task, sampler: StepwiseSampler) -> None:
    """Policies were trained on the dataset's observations: evaluation must build the same."""
    if task.observation is None:
        return
    here = ObservationLayout(sampler.scorer.dim, sampler.scorer.dim)
    if task.observation != here:
        raise ValueError(
            f"meta/info.json records observation layout {task.observation.to_dict()}, but "
            f"scorer {task.scorer!r} gives {here.to_dict()}: evaluate with the scorer the "
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


def _heuristics(cfg: EvalConfig, task: Task) -> list[tuple[str, Policy | EpisodicPolicy]]:
    """(name, policy) of the heuristics on the dataset's grid."""
    t = task.actions
    methods: list[tuple[str, Policy | EpisodicPolicy]] = []
    if cfg.random_stride and len(t.jumps) > 1:
        methods.append(("random-stride", RandomStride(t, cfg.seed)))
    methods += [(f"stability>={x:g}", StabilityStop(x, t)) for x in cfg.stability_thresholds]
    methods += [(f"clip-delta<{x:g}", ClipDeltaStop(x, t)) for x in cfg.clip_delta_thresholds]
    methods += [(f"patience-{n}", PatienceStop(cfg.patience_min_gain, n, t)) for n in cfg.patience]
    if len(t.jumps) > 1:
        methods += [(f"progress<={x:g}", ProgressStride(x, t)) for x in cfg.progress_tolerances]
    return methods


def _check_policies(policies: Mapping[str, Policy], task: Task) -> None:
    """Every learned policy acts on the dataset's action table and observations."""
    t = task.actions
    for name, policy in policies.items():
        manifest = getattr(policy, "manifest", None)
        if isinstance(manifest, dict):
            check_observer(task, manifest.get("observer"), f"policy {name!r}")
        if not callable(getattr(policy, "act", None)):
            raise TypeError(f"policy {name!r} has no act(obs, mask) method")
        n = getattr(policy, "action_size", None)
        if n is not None and int(n) != t.n:
            raise ValueError(
                f"policy {name!r} has {n} actions but the dataset's action table has {t.n} "
                f"({list(t.names)}): it was trained on another MDP"
            )


def _check_unique(names: Sequence[str]) -> None:
    dup = sorted({n for n in names if list(names).count(n) > 1})
    if dup:
        raise ValueError(f"method names must be unique, got {dup[0]!r} twice")


def _fixed(
    share: StepwiseSampler, task: Task, cfg: EvalConfig, held: HeldoutSet, bar: Any
) -> tuple[dict[str, MethodRun], list[tuple[str, str, int]]]:
    """Fixed schedules ``<solver>[-ays]-<k>`` (k-point grid, every point, NFE = k) and best-of-N."""
    prompts = [it.prompt for it in held.items]
    seeds = [it.seed for it in held.items]
    runs: dict[str, MethodRun] = {}
    fixed: list[tuple[str, str, int]] = []
    for grid, solver in fixed_families(share, cfg):
        label = solver if grid == "uniform" else f"{solver}-{grid}"
        for k in sorted(cfg.baseline_steps):
            sampler = _fixed_sampler(share, task, solver, k, grid)
            name = f"{label}-{k}"
            bar.set_postfix_str(name)
            policy = FixedSchedule(sampler.table)
            runs[name] = run_method(
                sampler, policy, prompts, seeds, cfg.batch_size, name, bar.update
            )
            fixed.append((name, label, k))
    for n in cfg.best_of:
        for k in cfg.best_of_steps:
            # On the dataset's own base grid (a custom one exists only at n_max points).
            grid = "uniform" if task.settings.grid == "custom" else task.settings.grid
            sampler = _fixed_sampler(share, task, task.scheduler, k, grid)
            label = task.scheduler if grid == "uniform" else f"{task.scheduler}-{grid}"
            name = f"best-of-{n}-{label}-{k}"
            bar.set_postfix_str(name)
            policy = FixedSchedule(sampler.table)
            # Draw j of n: other seeds, the same prompts; the CLIP score picks (what a user can
            # see without a verifier).
            draws = [
                run_method(
                    sampler,
                    policy,
                    prompts,
                    [s + 7919 * j for s in seeds],
                    cfg.batch_size,
                    name,
                    bar.update,
                )
                for j in range(n)
            ]
            runs[name] = _best_of(draws)
    return runs, fixed


def fitting_solvers(sampler: StepwiseSampler) -> list[str]:
    """Every solver of :data:`addiffusion.diffusion.backbone.SCHEDULERS` that fits the backbone
    (flow-matching models: flowmatch-euler; the others: ddim, dpmsolver++, euler, unipc)."""
    from addiffusion.diffusion.backbone import FLOW_SCHEDULERS, SCHEDULERS

    return [s for s in SCHEDULERS if (s in FLOW_SCHEDULERS) == sampler.flow]


def fixed_families(sampler: StepwiseSampler, cfg: EvalConfig) -> list[tuple[str, str]]:
    """(grid, solver) of the fixed schedules: every solver of ``eval.solvers`` (or
    :func:`fitting_solvers`) on the uniform grid, and on the ays grid those that take custom
    timesteps (:data:`addiffusion.diffusion.backbone.CUSTOM_GRID_SCHEDULERS`) when the backbone
    has a VP noise schedule."""
    from addiffusion.diffusion.backbone import CUSTOM_GRID_SCHEDULERS, SCHEDULERS

    solvers = list(cfg.solvers) or fitting_solvers(sampler)
    out = []
    for grid in cfg.grids:
        for solver in solvers:
            if grid == "ays" and (
                sampler.flow or not issubclass(SCHEDULERS[solver][0], CUSTOM_GRID_SCHEDULERS)
            ):
                continue
            out.append((grid, solver))
    return out


def _fixed_sampler(
    share: StepwiseSampler, task: Task, solver: str, k: int, grid: str
) -> StepwiseSampler:
    # A k-point grid of `solver`, always advanced: no warm-up or refine applies, and no
    # per-point observation is needed (only the final image is decoded and scored).
    return task_sampler(
        task,
        "cpu",
        scheduler=solver,
        observe=False,
        share=share,
        n_max=k,
        grid=grid,
        timesteps=(),
        strides=(1,),
        warmup=0,
        refine_budget=0,
    )


def _best_of(draws: list[MethodRun]) -> MethodRun:
    clip = np.stack([d.components["clip_score"] for d in draws])
    pick = clip.argmax(0)
    rows = np.arange(clip.shape[1])
    return MethodRun(
        nfe=sum(d.nfe for d in draws),
        stop_step=draws[0].stop_step,
        refines=sum(d.refines for d in draws),
        components={
            c: np.stack([d.components[c] for d in draws])[pick, rows] for c in draws[0].components
        },
        images=np.stack([d.images for d in draws])[pick, rows],
        masked_actions=0,
        seconds=sum(d.seconds for d in draws),
    )


def run_baselines(
    dataset_dir: Path, cfg: EvalConfig, progress: bool = True, prompts: str | None = None
) -> BaselineRuns:
    """Run every method of :func:`evaluate` that is not a learned policy on the held-out pairs
    (``prompts`` as in :func:`evaluate`): the fixed schedules, best-of-N, the heuristics on the
    dataset's grid and the AdaptiveDiffusion baselines, exactly as :func:`evaluate` runs them
    when it is given none. :func:`addiffusion.eval.baselines.save_baselines` stores them for
    ``evaluate(..., baselines=...)`` (``addiffusion eval baselines``)."""
    held = load_heldout(Path(dataset_dir), cfg, prompts)
    sampler = task_sampler(held.task, cfg.device)
    _check_observation_layout(held.task, sampler)
    return _run_baselines(
        sampler, cfg, held, _fingerprint(dataset_dir, cfg, held, prompts), progress
    )


def _fingerprint(
    dataset_dir: Path, cfg: EvalConfig, held: HeldoutSet, prompts: str | None
) -> dict[str, Any]:
    from addiffusion.datasets.relabel import info_sha256

    return fingerprint(info_sha256(Path(dataset_dir)), cfg, held.items, prompts)


def _run_baselines(
    sampler: StepwiseSampler,
    cfg: EvalConfig,
    held: HeldoutSet,
    fp: dict[str, Any],
    progress: bool,
) -> BaselineRuns:
    torch.manual_seed(cfg.seed)
    task = held.task
    prompts = [it.prompt for it in held.items]
    seeds = [it.seed for it in held.items]
    runnable = [(name, "dataset", policy, sampler) for name, policy in _heuristics(cfg, task)]
    if cfg.adaptive_diffusion_thresholds:
        # Its own sampler over the same pipeline: the dataset's grid plus the reuse action
        # (0 NFE); the rule reads latents, so no per-point observation is computed.
        skip = task_sampler(task, cfg.device, observe=False, share=sampler, reuse=True)
        runnable += [
            (
                f"adaptive-diffusion<={x:g}",
                "reuse",
                AdaptiveDiffusionSkip(x, cfg.adaptive_diffusion_max_skips, skip.table),
                skip,
            )
            for x in cfg.adaptive_diffusion_thresholds
        ]
    n_fixed = len(fixed_families(sampler, cfg)) * len(cfg.baseline_steps)
    n_fixed += sum(cfg.best_of) * len(cfg.best_of_steps)
    bar = tqdm(
        total=(n_fixed + len(runnable)) * len(prompts),
        unit="image",
        disable=not progress,
        desc="eval baselines",
    )
    fixed_runs, fixed = _fixed(sampler, task, cfg, held, bar)
    fixed_names = {name for name, _, _ in fixed}
    runs = [
        BaselineRun(name, "baseline" if name in fixed_names else "heuristic", "k-point", run)
        for name, run in fixed_runs.items()
    ]
    for name, where, policy, on in runnable:
        bar.set_postfix_str(name)
        run = run_method(on, policy, prompts, seeds, cfg.batch_size, name, bar.update)
        runs.append(BaselineRun(name, "heuristic", where, run))
    bar.close()
    _check_unique([b.name for b in runs])
    return BaselineRuns(runs, fixed, fp)


def evaluate(
    dataset_dir: Path,
    policies: Mapping[str, Policy],
    cfg: EvalConfig,
    reward_cfg: RewardConfig,
    out_dir: Path,
    progress: bool = True,
    prompts: str | None = None,
    checkpoints: Mapping[str, Sequence[Checkpoint]] | None = None,
    baselines: BaselineRuns | None = None,
) -> dict[str, Any]:
    """Run every method on the held-out pairs and write the outputs into ``out_dir``.

    ``prompts``: a prompt source the user brings (see :func:`addiffusion.eval.heldout.
    load_heldout`) evaluated instead of the dataset's held-out prompts, on the dataset's task.
    ``checkpoints``: per learned method of ``policies``, its (step, policy, FQE value) points
    along training (policy None: the method itself, its final point), for ``eval.checkpoints``.
    Methods named ``<name>@seed<s>`` are further training seeds of ``<name>``: evaluated and
    summarised over seeds (``"seeds"``), never the headline.
    ``baselines``: the non-policy runs, computed before by :func:`run_baselines` (e.g. loaded by
    :func:`addiffusion.eval.baselines.load_baselines`) instead of run here; their fingerprint
    must match this evaluation's (dataset, prompts, pairs, :data:`addiffusion.eval.baselines.
    BASELINE_KEYS`), else a :class:`addiffusion.config.UserError` names what differs. The
    outputs are the same either way.

    Returns the metrics written to ``metrics.json``: ``{method: {"kind", "nfe", "nfe_std",
    "clip_score", "quality", ["verifier", "verifier_acc"], "refines", "masked_actions",
    "seconds_per_image", "by_category", for methods on the dataset's grid "stopped_early"
    (fraction of images decoded before its last point), and for heuristics and policies "vs",
    "nfe_diff", "<score>_diff", "<score>_ci_low", "<score>_ci_high", "<score>_p", "frontier"}}`` plus
    ``"frontier"``: the best learned policy against the all-solver fixed frontier.
    """
    torch.manual_seed(cfg.seed)
    out_dir = Path(out_dir)
    held = load_heldout(Path(dataset_dir), cfg, prompts)
    task = held.task
    settings = task.settings
    _check_policies(policies, task)
    current = _fingerprint(dataset_dir, cfg, held, prompts)
    if baselines is not None:
        baselines.check(current)  # before anything is loaded or run
    prompt_list = [it.prompt for it in held.items]
    seeds = [it.seed for it in held.items]
    sampler = task_sampler(task, cfg.device)
    _check_observation_layout(task, sampler)
    if baselines is None:
        _check_unique([*(n for n, _ in _heuristics(cfg, task)), *policies])
        baselines = _run_baselines(sampler, cfg, held, current, progress)
    # Run order, hence the order of every output: fixed schedules and best-of-N, heuristics on
    # the dataset's grid, learned policies, AdaptiveDiffusion.
    order = {"k-point": 0, "dataset": 1, "reuse": 3}
    _check_unique([*(b.name for b in baselines.runs), *policies])
    fixed = baselines.fixed
    fixed_runs = {b.name for b in baselines.runs if b.sampler == "k-point"}
    entries: list[tuple[int, str, str, MethodRun | None]] = [
        (order[b.sampler], b.name, b.kind, b.run) for b in baselines.runs
    ]
    entries += [(2, name, "policy", None) for name in policies]
    entries.sort(key=lambda e: e[0])  # stable: each group keeps its own order

    # The learned policies, from the same RNG state whether the baselines ran here or not.
    torch.manual_seed(cfg.seed)
    points = {m: list(c) for m, c in (checkpoints or {}).items() if m in policies}
    n_ckpt = sum(p is not None for c in points.values() for _, p, _ in c) if cfg.checkpoints else 0
    bar = tqdm(
        total=(len(policies) + n_ckpt) * len(prompt_list),
        unit="image",
        disable=not progress,
        desc="eval",
    )
    runs: dict[str, tuple[str, MethodRun]] = {}
    for _, name, kind, run in entries:
        if run is None:
            bar.set_postfix_str(name)
            run = run_method(
                sampler, policies[name], prompt_list, seeds, cfg.batch_size, name, bar.update
            )
        runs[name] = (kind, run)
    ckpt_runs: dict[tuple[str, int], MethodRun] = {}
    if cfg.checkpoints and points:
        for method, chain in points.items():
            for step, policy, _ in chain:
                if policy is None:
                    ckpt_runs[method, step] = runs[method][1]
                    continue
                bar.set_postfix_str(f"{method}@{step}")
                ckpt_runs[method, step] = run_method(
                    sampler, policy, prompt_list, seeds, cfg.batch_size, method, bar.update
                )
    bar.close()

    # Summaries, then paired comparisons against the fixed schedule of closest mean NFE.
    categories = [it.category for it in held.items]
    groups = np.array([it.prompt_id for it in held.items])
    scores = {name: _scores(run, reward_cfg, held) for name, (_, run) in runs.items()}
    metric = "verifier" if "verifier" in scores[fixed[0][0]] else "quality"
    metrics: dict[str, dict[str, Any]] = {}
    for name, (kind, run) in runs.items():
        m: dict[str, Any] = {"kind": kind}
        m.update(summarize(run.nfe, scores[name], categories))
        m["refines"] = float(run.refines.mean())
        m["masked_actions"] = run.masked_actions
        m["seconds_per_image"] = run.seconds_per_image
        if name not in fixed_runs:  # methods on the dataset's grid (best-of-N runs k-point ones)
            # Images decoded from x̂0 before the grid's last point (a stop mid-schedule) rather
            # than at its end: the way a stop-and-jump policy can lose to a short schedule.
            m["stopped_early"] = float((run.stop_step < settings.n_max - 1).mean())
        for key, values in {"nfe": run.nfe, **scores[name]}.items():
            m[f"{key}_ci"] = mean_ci(
                values, groups, cfg.bootstrap_samples, cfg.confidence, cfg.seed
            )
        if kind == "policy":
            # The MDP's return (up to a constant shared by all methods), beside FQE's estimate.
            ret = episode_return(scores[name]["quality"], run.nfe, reward_cfg)
            m["return"] = float(ret.mean())
            m["return_ci"] = mean_ci(ret, groups, cfg.bootstrap_samples, cfg.confidence, cfg.seed)
            final = [f for step, p, f in points.get(name, []) if p is None]
            m["fqe"] = final[0] if final else None
        metrics[name] = m
    base_nfe = {n: m["nfe"] for n, m in metrics.items() if m["kind"] == "baseline"}
    fruns = [frontier.FixedRun(n, solver, k, scores[n][metric]) for n, solver, k in fixed]
    comparisons = []
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
        c = frontier.compare_to_frontier(
            name,
            runs[name][1].nfe.astype(np.float64),
            scores[name][metric],
            fruns,
            groups,
            cfg.bootstrap_samples,
            cfg.confidence,
            cfg.seed,
            metric,
        )
        m["frontier"] = _comparison_dict(c)
        if m["kind"] == "policy":
            cats = np.array(categories)
            m["frontier_by_category"] = {
                cat: _comparison_dict(
                    frontier.compare_to_frontier(
                        name,
                        runs[name][1].nfe[cats == cat].astype(np.float64),
                        scores[name][metric][cats == cat],
                        [
                            frontier.FixedRun(r.name, r.solver, r.k, r.scores[cats == cat])
                            for r in fruns
                        ],
                        groups[cats == cat],
                        cfg.bootstrap_samples,
                        cfg.confidence,
                        cfg.seed,
                        metric,
                    )
                )
                for cat in sorted(set(categories))
            }
        if m["kind"] == "policy" and SEED_SEP not in name:
            comparisons.append(c)
    oracle_nfe, oracle_score = frontier.oracle_items(fruns)
    summary: dict[str, Any] = {
        "metric": metric,
        "all_solvers": [p.__dict__ for p in frontier.fixed_frontier(fruns)],
        "per_solver": {
            solver: [p.__dict__ for p in frontier.fixed_frontier(fruns, solver)]
            for solver in dict.fromkeys(s for _, s, _ in fixed)
        },
        "oracle": {"nfe": float(oracle_nfe.mean()), metric: float(oracle_score.mean())},
        "oracle_curve": frontier.oracle_curve(fruns),
    }
    # How much a per-prompt choice of fixed schedule could gain at all, split by what the chooser
    # knows: the prompt's type (category), the prompt (not the seed), or the item (hindsight).
    # In-sample these reward luck (the best of many schedules on a few seeds), so the category
    # and prompt choices are also cross-fitted: picked on one seed of each prompt, scored on the
    # others.
    cats = np.array(categories)
    curves = {
        "category": frontier.oracle_curve(fruns, groups=cats),
        "prompt": frontier.oracle_curve(fruns, groups=groups),
        "item": summary["oracle_curve"],
    }
    seed_index = _seed_index(groups)
    if len(set(seed_index.tolist())) > 1:
        curves["category_heldout_seed"] = frontier.heldout_seed_curve(fruns, cats, seed_index)
        curves["prompt_heldout_seed"] = frontier.heldout_seed_curve(fruns, groups, seed_index)
    summary["headroom"] = {
        name: {**frontier.headroom(curve, fruns).__dict__, "curve": curve}
        for name, curve in curves.items()
    }
    if comparisons:
        best = frontier.best_learned(comparisons)
        summary.update(_comparison_dict(best))
        summary["line"] = best.line()
    learned: dict[str, Any] = {"seeds": seed_summary(metrics, metric)}
    per_item = {
        name: {
            metric: scores[name][metric],
            "quality": scores[name]["quality"],
            "nfe": run.nfe.astype(np.float64),
            "return": episode_return(scores[name]["quality"], run.nfe, reward_cfg),
        }
        for name, (kind, run) in runs.items()
        if kind == "policy"
    }
    learned["pairs"] = pair_comparisons(
        cfg.pair_list(), per_item, groups, cfg.bootstrap_samples, cfg.confidence, cfg.seed
    )
    if ckpt_runs:
        ckpts = []
        for method, chain in points.items():
            for step, _, fqe in chain:
                r = ckpt_runs[method, step]
                sc = _scores(r, reward_cfg, held)
                ret = episode_return(sc["quality"], r.nfe, reward_cfg)
                ckpts.append(
                    CheckpointRun(
                        method, step, ret, float(r.nfe.mean()), float(sc[metric].mean()), fqe
                    )
                )
        learned["checkpoints"] = checkpoint_report(ckpts, groups)

    out_dir.mkdir(parents=True, exist_ok=True)
    report.write_metrics(
        {**metrics, "learned": learned, "frontier": summary}, out_dir / "metrics.json"
    )
    report.write_pareto_csv(metrics, out_dir / "pareto.csv")
    report.write_items(
        {name: run for name, (_, run) in runs.items()},
        scores,
        held.items,
        out_dir / "items.parquet",
    )
    points = {n: (m["nfe"], m[metric]) for n, m in metrics.items() if m["kind"] != "baseline"}
    frontier.plot_frontier(
        out_dir / "pareto.png",
        fruns,
        points,
        [n for n in points if metrics[n]["kind"] == "policy"],
        metric,
        {name.replace("_", " "): c for name, c in curves.items() if name != "item"},
    )
    shown = [n for n in runs if runs[n][0] != "baseline" or n.startswith(task.scheduler)]
    report.plot_samples({n: runs[n][1].images for n in shown}, prompt_list, out_dir / "samples.png")
    context = {
        "dataset": str(dataset_dir),
        "backbone": task.backbone,
        "scheduler": task.scheduler,
        "scorer": task.scorer,
        "n_max": settings.n_max,
        "actions": ", ".join(task.actions.names),
        "warmup": settings.warmup,
        "held-out prompts": len(set(groups.tolist())),
        "seeds per prompt": cfg.seeds_per_prompt,
        "images per method": len(prompt_list),
        "reward": f"weights {dict(reward_cfg.weights)}, normalize {reward_cfg.normalize}",
        "device": str(sampler.device),
        "frontier": summary.get("line", "no learned policy evaluated"),
    }
    report.write_report(metrics, context, out_dir / "report.md", learned)
    return {**metrics, "learned": learned, "frontier": summary}


def _seed_index(prompt_ids: np.ndarray) -> np.ndarray:
    """(N,) index of each item among the items of its prompt, in order (its seed's rank)."""
    seen: dict[int, int] = {}
    out = np.empty(len(prompt_ids), np.int64)
    for i, p in enumerate(prompt_ids.tolist()):
        out[i] = seen.get(p, 0)
        seen[p] = out[i] + 1
    return out


def _comparison_dict(c: frontier.FrontierComparison) -> dict[str, Any]:
    return {
        "method": c.method,
        "nfe": c.nfe,
        "score": c.score,
        "frontier": c.frontier,
        "gain": c.gain,
        "ci": list(c.ci),
        "nfe_ratio": c.nfe_ratio,
        "oracle_ratio": c.oracle_ratio,
        "frontier_label": c.frontier_label,
    }
