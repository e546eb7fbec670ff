"""``addiffusion eval``: baselines, heuristics and learned policies on the held-out prompts."""

from __future__ import annotations

import argparse
import importlib
import json
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from addiffusion.config import read_params
from addiffusion.eval.config import EvalConfig
from addiffusion.eval.learned import SEED_SEP
from addiffusion.offline_rl.config import OfflineRLConfig
from addiffusion.rewards.config import RewardConfig


def _d3rlpy_device(device: str) -> str:
    import torch

    if device == "auto":
        return "cuda:0" if torch.cuda.is_available() else "cpu:0"
    return {"cpu": "cpu:0", "cuda": "cuda:0"}.get(device, device)


def load_offline_policies(
    offline_dir: Path, device: str, names: Sequence[str] | None = None
) -> dict:
    """The policies of an offline_rl run that ``names`` lists: ``names[0]`` is the main one
    (``<dir>/policy.d3``), the others its baselines (``<dir>/baselines/<name>/policy.d3``);
    keyed by algo (iql, cql, bc). ``None``: the main policy and the baselines its manifest's
    config lists. Each goes through :func:`addiffusion.offline_rl.load_policy` (trusted and
    sha256-checked). A named policy that is missing is an error; a folder under ``baselines/``
    that is not named is never loaded (a warning names it).
    """
    from addiffusion.offline_rl import PolicyLoadError, load_policy

    offline_dir = Path(offline_dir)
    main_path = offline_dir / "policy.d3"
    if not main_path.exists():
        raise FileNotFoundError(
            f"{main_path} not found: --offline must be an offline-rl output folder"
        )
    main = load_policy(main_path, offline_dir / "manifest.json", device=_d3rlpy_device(device))
    if names is None:
        names = [main.algo_name, *main.manifest.get("config", {}).get("baselines", [])]
    if main.algo_name != names[0]:
        raise PolicyLoadError(
            f"offline_rl.algo is {names[0]!r}, but {main_path} is a {main.algo_name!r} policy: "
            "rerun the offline_rl stage (`dvc repro offline_rl`)"
        )
    baselines = offline_dir / "baselines"
    extra = sorted(d.name for d in baselines.glob("*") if d.is_dir() and d.name not in names[1:])
    if extra:
        warnings.warn(
            f"ignoring {', '.join(str(baselines / n) for n in extra)}: offline_rl.baselines "
            f"names only {list(names[1:])}",
            stacklevel=2,
        )
    policies = {main.algo_name: main}
    for name in names[1:]:
        path = baselines / name / "policy.d3"
        if not path.exists():
            raise FileNotFoundError(
                f"{path} not found: offline_rl.baselines names {name!r}; rerun the offline_rl "
                "stage (`dvc repro offline_rl`) or remove it from offline_rl.baselines"
            )
        policy = load_policy(path, path.parent / "manifest.json", device=_d3rlpy_device(device))
        if policy.algo_name != name:
            raise PolicyLoadError(f"{path} is a {policy.algo_name!r} policy, not {name!r}")
        policies[name] = policy
    return policies


def load_checkpoints(
    offline_dir: Path, names: Sequence[str], device: str, final_only: bool = False
) -> dict[str, list[tuple[int, Any, float | None]]]:
    """Per policy of :func:`load_offline_policies` (``names[0]`` the main one, the others its
    baselines), the points its ``ope.json`` values: ``(step, policy, FQE value)`` in training
    order, policy None for the final one (the method itself). Each checkpoint is one its run's
    manifest lists, loaded through the trusted loader. A run without ``ope.json`` has none.
    ``final_only``: only the final point (its FQE value), no checkpoint is loaded."""
    from addiffusion.offline_rl import PolicyLoadError, load_policy

    out: dict[str, list[tuple[int, Any, float | None]]] = {}
    for name in names:
        run = Path(offline_dir) if name == names[0] else Path(offline_dir) / "baselines" / name
        path = run / "ope.json"
        if not path.is_file():
            continue
        listed = set(json.loads((run / "manifest.json").read_text()).get("checkpoints", []))
        chain = []
        for point in json.loads(path.read_text()).get("points", []):
            rel, value = point.get("path"), point.get("initial_value")
            if rel == ".":
                chain.append((int(point["step"]), None, value))
                continue
            if final_only:
                continue
            if rel not in listed:
                raise PolicyLoadError(
                    f"{path} values {rel!r}, which is not a checkpoint its run's manifest lists "
                    f"({sorted(listed)})"
                )
            policy = load_policy(
                run / rel / "policy.d3", run / rel / "manifest.json", device=_d3rlpy_device(device)
            )
            chain.append((int(point["step"]), policy, value))
        out[name] = chain
    return out


def load_online_policy(online_dir: Path) -> object:
    """The PPO fine-tuned actor of an online_finetune run (weights checked against the
    manifest's sha256)."""
    package = importlib.import_module("addiffusion.online_finetune")
    load = getattr(package, "load_finetuned_policy", None)
    if load is None:
        load = importlib.import_module("addiffusion.online_finetune.ppo").load_finetuned_policy
    return load(online_dir)


def _set_threads(threads: int) -> None:
    if threads > 0:
        import torch

        torch.set_num_threads(threads)


def _eval_baselines(args: argparse.Namespace) -> int:
    _set_threads(args.threads)
    cfg = EvalConfig.from_params(read_params(args.params))
    from addiffusion.eval.baselines import save_baselines
    from addiffusion.eval.evaluate import run_baselines  # heavy imports only once params are valid

    baselines = run_baselines(
        Path(args.dataset), cfg, progress=not args.quiet, prompts=args.prompts
    )
    save_baselines(baselines, Path(args.out))
    width = max(len(b.name) for b in baselines.runs)
    for b in baselines.runs:
        clip = float(b.run.components["clip_score"].mean())
        print(f"{b.name:<{width}}  NFE {b.run.nfe.mean():6.2f}  clip_score {clip:.4f}")
    print(
        f"eval baselines: wrote {len(baselines.runs)} runs ({len(baselines.fixed)} fixed "
        f"schedules) to {args.out}"
    )
    return 0


def _eval(args: argparse.Namespace) -> int:
    if args.dataset is None:
        args.parser.error("the following arguments are required: --dataset")
    _set_threads(args.threads)
    params = read_params(args.params)
    cfg = EvalConfig.from_params(params)
    reward_cfg = RewardConfig.from_params(params)
    policies: dict = {}
    checkpoints: dict = {}
    if args.offline is not None:
        # The policies the params file names (without an offline_rl section: the ones the run's
        # manifest lists), never whatever lies in the folder.
        names = None
        seeds: list[int] = []
        if "offline_rl" in params:
            offline_cfg = OfflineRLConfig.from_params(params)
            names = [offline_cfg.algo, *offline_cfg.baselines]
            seeds = offline_cfg.seeds[1:]
        main = load_offline_policies(Path(args.offline), cfg.device, names)
        policies.update(main)
        names = list(main)
        # Every seed's FQE values; with eval.checkpoints, its checkpoints are rolled out too.
        only = not cfg.checkpoints
        checkpoints = load_checkpoints(Path(args.offline), names, cfg.device, only)
        for seed in seeds:
            run = Path(args.offline) / "seeds" / str(seed)
            more = load_offline_policies(run, cfg.device, names)
            policies.update({f"{n}{SEED_SEP}{seed}": p for n, p in more.items()})
            chains = load_checkpoints(run, names, cfg.device, only)
            checkpoints.update({f"{n}{SEED_SEP}{seed}": c for n, c in chains.items()})
    if args.online is not None:
        online = Path(args.online)
        online_seeds: list[int] = []
        if "online_finetune" in params:
            from addiffusion.online_finetune.config import OnlineFinetuneConfig

            online_seeds = OnlineFinetuneConfig.from_params(params).seeds[1:]
        runs = [
            ("", online),
            *((f"{SEED_SEP}{s}", online / "seeds" / str(s)) for s in online_seeds),
        ]
        for suffix, run in runs:
            policies[f"ppo{suffix}"] = load_online_policy(run)
            if (run / "scratch" / "manifest.json").is_file():
                policies[f"ppo-scratch{suffix}"] = load_online_policy(run / "scratch")
    from addiffusion.eval.evaluate import evaluate  # heavy imports only once params are valid

    baselines = None
    if args.baselines is not None:
        from addiffusion.eval.baselines import load_baselines

        baselines = load_baselines(Path(args.baselines))
    metrics = evaluate(
        Path(args.dataset),
        policies,
        cfg,
        reward_cfg,
        Path(args.out),
        progress=not args.quiet,
        prompts=args.prompts,
        checkpoints=checkpoints,
        baselines=baselines,
    )
    summary = metrics.pop("frontier")
    learned = metrics.pop("learned")
    metric = summary["metric"]
    width = max(len(n) for n in metrics)
    for name, m in metrics.items():
        f = m.get("frontier")
        vs = f"  vs frontier {f['frontier']:.4f}: gain {f['gain']:+.4f}" if f else ""
        if "stopped_early" in m:
            vs += f"  stopped early {m['stopped_early']:.0%}"
        print(f"{name:<{width}}  NFE {m['nfe']:6.2f}  {metric} {m[metric]:.4f}{vs}")
    ck = learned.get("checkpoints")
    if ck:
        print(
            f"fqe: spearman={ck['spearman']:.3f} over {ck['n_points']} (policy, checkpoint) points"
        )
    for pair, values in learned.get("pairs", {}).items():
        r = values[metric]
        print(f"pair {pair}: {metric} {r['diff']:+.4f} [{r['ci_low']:+.4f}, {r['ci_high']:+.4f}]")
    print(f"eval: wrote metrics.json, pareto.csv, pareto.png, samples.png, report.md to {args.out}")
    # The headline, last: the best learned policy against the all-solver fixed frontier.
    print(summary.get("line", "frontier: no learned policy evaluated"))
    return 0


PROMPTS_HELP = (
    "evaluate these prompts instead of the dataset's held-out ones, on the dataset's task: a "
    ".txt (one per line), .csv/.tsv (DrawBench, PartiPrompts or a prompt column), .json (COCO "
    "captions), .jsonl (GenEval) file, builtin, shapes or hf:<dataset id>; "
    "eval.seeds_per_prompt seeds each, eval.n_prompts caps the count (default: held-out)"
)


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "eval",
        help="compare fixed-step samplers, heuristics and learned policies on held-out prompts",
        usage=(
            "%(prog)s [-h] --dataset DATASET [--prompts SOURCE]\n"
            "                        [--offline OFFLINE] [--online ONLINE] [--baselines DIR]\n"
            "                        [--out OUT] [--params PARAMS] [--threads THREADS] [--quiet]\n"
            "       %(prog)s baselines [-h] --dataset DATASET\n"
            "                                  [--prompts SOURCE] [--out OUT] [--params PARAMS]\n"
            "                                  [--threads THREADS] [--quiet]"
        ),
        description=(
            "Evaluate on the dataset's held-out prompts (episodes with split == heldout; or "
            "--prompts), eval.seeds_per_prompt seeds each, all methods on the same (prompt, "
            "seed) pairs.\n\n"
            "Fixed schedules <solver>-<k> for every solver that fits the backbone "
            "(eval.solvers) and k in eval.baseline_steps (NFE = k) draw the fixed-schedule "
            "frontier; the oracle in hindsight is the cheapest fixed schedule reaching each "
            "item's best score. Baselines at matched NFE: best-of-N seeds picked by CLIP score, "
            "a random-stride policy, AdaptiveDiffusion (reuse the last denoiser output while "
            "the latents change little).\n\n"
            "Heuristics on the dataset's grid: stop once stability >= x, "
            "once the CLIP-score gain < x, or after n points without gain (patience); a "
            "progress-based adaptive stride schedule.\n\n"
            "Learned policies: the offline-rl ones that the params file names (offline_rl.algo: "
            "policy.d3; offline_rl.baselines: baselines/<name>/policy.d3; without an offline_rl "
            "section, the baselines the run's manifest lists; other folders there are ignored), "
            "each loaded only when dvc.lock or the trust store records its hash and it "
            "matches its manifest.json, and the online-finetune actor.\n\n"
            "Everything that is not a learned policy (fixed schedules, best-of-N, heuristics, "
            "AdaptiveDiffusion) can be computed once by `addiffusion eval baselines` (dvc "
            "stage eval_baselines) and read with --baselines: the eval then runs only the "
            "learned policies, with the same outputs, after checking that the stored runs were "
            "computed for this dataset, these prompts and seeds and these eval keys (a "
            "mismatch names the keys).\n\n"
            "Metrics per method: mean NFE, wall "
            "seconds per image, CLIP score, the shapes verifier's score when the dataset has it, "
            "reward-defined quality Q, per category, a prompt-cluster paired bootstrap against "
            "the fixed schedule of closest NFE and against the interpolated all-solver frontier."
            "\n\nWrites <out>/metrics.json (dvc metrics), pareto.csv (dvc plots), "
            "items.parquet, pareto.png, samples.png, report.md; the last line printed is the "
            "headline 'frontier: method=... gain=... ci=[...] nfe_ratio=... oracle_ratio=...'."
            "\n\nSettings come from the `eval` and `rewards` sections of the params file."
        ),
    )
    # Not required=True here: `eval baselines --dataset ...` hands --dataset to the subcommand,
    # and argparse would then ask the parent for it too; _eval checks it instead.
    p.add_argument(
        "--dataset",
        default=None,
        help="built dataset folder (meta/info.json + episodes); required",
    )
    p.add_argument("--prompts", default=None, metavar="SOURCE", help=PROMPTS_HELP)
    p.add_argument("--offline", default=None, help="offline-rl output folder (optional)")
    p.add_argument("--online", default=None, help="online-finetune output folder (optional)")
    p.add_argument(
        "--baselines",
        default=None,
        metavar="DIR",
        help="the runs `addiffusion eval baselines` wrote (e.g. results/eval_baselines): use "
        "them instead of running the fixed schedules, best-of-N, heuristics and "
        "AdaptiveDiffusion again; refused, naming the keys, when they were computed for another "
        "dataset, other prompts or seeds or other eval keys (default: run them here)",
    )
    p.add_argument("--out", default="results/eval", help="output folder (default: %(default)s)")
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (default: 0 = torch's choice)"
    )
    p.add_argument("--quiet", action="store_true", help="no progress bar")
    p.set_defaults(func=_eval, parser=p)

    sub_eval = p.add_subparsers(dest="eval_command", metavar="<command>", prog=p.prog)
    b = sub_eval.add_parser(
        "baselines",
        help="run and store the non-policy methods once (fixed schedules, heuristics, ...)",
        description=(
            "Run every method of `addiffusion eval` that is not a learned policy, exactly as "
            "the eval runs them, and store their runs for `addiffusion eval --baselines`: the "
            "fixed schedules <solver>[-ays]-<k> (eval.solvers, eval.grids, "
            "eval.baseline_steps), best-of-N (eval.best_of, eval.best_of_steps), the heuristics "
            "on the dataset's grid (random stride, stability, CLIP delta, patience, progress) "
            "and AdaptiveDiffusion, on the held-out (prompt, seed) pairs (or --prompts).\n\n"
            "They depend on none of the learned policies, so the eval_baselines stage runs them "
            "once and an ablation of the offline RL (`dvc exp run -S offline_rl....`) re-runs "
            "only the eval stage's policies.\n\n"
            "Writes <out>/index.json (per method: name, kind, file, masked actions, seconds; "
            "the fixed schedules; and the fingerprint of what the runs depend on: every eval "
            "key except checkpoints, pairs, bootstrap_samples and confidence, the device type, "
            "the sha256 of the dataset's meta/info.json, the --prompts source and the held-out "
            "prompt ids, seeds and texts) and one compressed .npz per method (NFE, stop step, "
            "refines, raw score components, final images; no pickle). The folder is replaced "
            "only once it is complete.\n\nSettings come from the `eval` section of the params "
            "file."
        ),
    )
    b.add_argument(
        "--dataset", required=True, help="built dataset folder (meta/info.json + episodes)"
    )
    b.add_argument("--prompts", default=None, metavar="SOURCE", help=PROMPTS_HELP)
    b.add_argument(
        "--out", default="results/eval_baselines", help="output folder (default: %(default)s)"
    )
    b.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    b.add_argument(
        "--threads", type=int, default=0, help="torch CPU threads (default: 0 = torch's choice)"
    )
    b.add_argument("--quiet", action="store_true", help="no progress bar")
    b.set_defaults(func=_eval_baselines)
