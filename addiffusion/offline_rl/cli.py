"""``addiffusion offline-rl``: train the offline policy (and baselines); verify, trust, export or
evaluate off-policy (FQE) a trained one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from addiffusion.config import read_params
from addiffusion.offline_rl.config import OfflineRLConfig


def _replay_buffers(
    dataset: Path, rewards: Path, cfg: OfflineRLConfig | None = None
) -> tuple[Any, Any]:
    """(train, validation) d3rlpy buffers of ``dataset`` with ``rewards``, with the ablations
    of ``cfg`` (``action_space``, ``drop_observations``) when given."""
    from addiffusion.datasets.d3rlpy_convert import dataset_table, to_replay_buffers
    from addiffusion.task import read_info

    # Validation prompts: the split `datasets build` recorded in meta/info.json (its column
    # rl_split), so every stage agrees on which prompts the policy never saw.
    split = read_info(dataset).get("rl_split")
    if not isinstance(split, dict) or not {"val_fraction", "seed"} <= set(split):
        raise SystemExit(
            f"{dataset / 'meta' / 'info.json'} has no rl_split "
            "{val_fraction, seed}: rebuild the dataset with `addiffusion datasets build`"
        )
    allowed = dataset_table(dataset).allowed(cfg.action_space) if cfg is not None else None
    drop = cfg.drop_observations if cfg is not None else ()
    return to_replay_buffers(
        dataset, rewards, float(split["val_fraction"]), int(split["seed"]), allowed, drop
    )


def quiet_d3rlpy() -> None:
    """Silence d3rlpy's structlog info/debug lines (its fit prints every config and epoch)."""
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))


def _train(args: argparse.Namespace) -> int:
    import torch

    from addiffusion.offline_rl.train import train_offline
    from addiffusion.task import read_task

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    if args.quiet:
        quiet_d3rlpy()
    cfg = OfflineRLConfig.from_params(read_params(args.params))
    train, val = _replay_buffers(Path(args.dataset), Path(args.rewards), cfg)
    task = read_task(Path(args.dataset))
    metrics = train_offline(
        train,
        val,
        cfg,
        Path(args.out),
        actions=task.actions,
        observer=task.observer,
        layout=task.observation,
        show_progress=not args.quiet,
    )
    runs = [metrics, *metrics.get("seeds", {}).values()]
    for run in runs:
        for name, m in [(cfg.algo, run), *run.get("baselines", {}).items()]:
            stop = (m.get("val") or {}).get("stop") or {}
            fqe = (m.get("fqe") or {}).get("initial_value", float("nan"))
            print(
                f"offline-rl {name} (seed {m['seed']}): {m['n_steps']} steps, val stop regret "
                f"{stop.get('regret', float('nan')):.4f}, mean stop step "
                f"{stop.get('mean_stop_step', float('nan')):.2f} "
                f"(oracle {stop.get('oracle_stop_step', float('nan')):.2f}), FQE value {fqe:.4f}"
            )
    print(f"offline-rl: wrote {Path(args.out) / 'policy.d3'} and its manifest.json")
    return 0


def _fqe(args: argparse.Namespace) -> int:
    import torch

    from addiffusion.config import UserError
    from addiffusion.eval.cli import load_offline_policies
    from addiffusion.offline_rl.ope import FQESettings, fqe_estimate
    from addiffusion.task import read_task

    offline, dataset, rewards = Path(args.offline), Path(args.dataset), Path(args.rewards)
    for path, flag, what in [
        (offline / "policy.d3", "--offline", "an `offline-rl train` output folder"),
        (dataset / "meta" / "info.json", "--dataset", "a dataset folder from `datasets build`"),
        (rewards, "--rewards", "a rewards file from `datasets relabel`"),
    ]:
        if not path.is_file():
            raise UserError(f"{path} not found: {flag} must be {what}")
    if args.threads > 0:
        torch.set_num_threads(args.threads)
    policies = load_offline_policies(offline, "cpu")
    train, val = _replay_buffers(dataset, rewards, _run_config(policies))
    fit = train if args.fit_on == "train" else val
    results: dict[str, Any] = {}
    table = read_task(dataset).actions
    dim = int(val.episodes[0].observation_signature.shape[0][0]) if val.episodes else None
    for name, policy in policies.items():
        # The run's own discount and width (train.py records both in every manifest).
        config, actor = policy.manifest.get("config", {}), policy.manifest.get("actor", {})
        try:
            policy.check_actions(table, f"dataset {dataset}")
            if dim is not None and dim != policy.observation_dim:
                raise ValueError(
                    f"the policy takes observations of dim {policy.observation_dim}, the "
                    f"dataset's are {dim}"
                )
            settings = FQESettings(
                n_steps=args.n_steps,
                learning_rate=args.learning_rate,
                batch_size=args.batch_size,
                target_update_interval=args.target_update_interval,
                gamma=float(config.get(policy.algo_name, {}).get("gamma", FQESettings.gamma)),
                hidden_units=list(actor.get("hidden_units", FQESettings().hidden_units)),
                seed=args.seed,
            )
            results[name] = fqe_estimate(policy.algo, fit, settings, evaluate=val)
        except ValueError as e:
            raise UserError(f"offline-rl fqe ({name}, {dataset}): {e}") from e
        print(
            f"fqe {name}: initial value {results[name]['initial_value']:.4f} "
            f"(behaviour return {results[name]['behaviour_return']:.4f})"
        )
    out = Path(args.out) if args.out else offline / "fqe.json"
    report = {"method": "d3rlpy DiscreteFQE", "fit_on": args.fit_on, "evaluated_on": "val"}
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps({**report, "policies": results}, indent=2) + "\n")
    print(f"offline-rl fqe: wrote {out}")
    return 0


def _run_config(policies: dict[str, Any]) -> OfflineRLConfig:
    """The ablations the run's policies were trained with (the main policy's manifest
    ``config``; one run shares them): FQE must see the data they saw."""
    config = next(iter(policies.values())).manifest["config"]
    return OfflineRLConfig(
        drop_observations=list(config.get("drop_observations", [])),
        action_space=config.get("action_space", "jumps_refine"),
    )


def _verify(args: argparse.Namespace) -> int:

    policy = _load(args)  # a refused file is a UserError: `main` says why and exits 2
    summary = {
        "algo": policy.algo_name,
        "observation_dim": policy.observation_dim,
        "action_size": policy.action_size,
        "actions": list(policy.actions.names),
        "sha256": policy.manifest["sha256"],
    }
    print(json.dumps(summary, indent=2))
    return 0


def _load(args: argparse.Namespace) -> Any:
    """``--policy`` (with ``--manifest`` / ``--trust-sha256``) through the trusted loader."""
    from addiffusion.offline_rl.policy import load_policy

    manifest = Path(args.manifest) if args.manifest else None
    return load_policy(Path(args.policy), manifest, trusted_sha256=args.trust_sha256)


def _export_onnx(args: argparse.Namespace) -> int:
    from addiffusion.offline_rl.onnx_export import export_onnx

    policy = _load(args)
    out = export_onnx(
        policy, Path(args.out) if args.out else Path(args.policy).with_suffix(".onnx")
    )
    print(
        f"offline-rl export-onnx: wrote the {policy.algo_name} policy to {out} (inputs obs "
        f"(B, {policy.observation_dim}) float32, mask (B, {policy.action_size}) bool; outputs "
        f"action (B,) int64, scores (B, {policy.action_size}) float32)"
    )
    return 0


def _trust(args: argparse.Namespace) -> int:
    import hashlib

    from addiffusion.config import UserError
    from addiffusion.offline_rl import trust

    path = Path(args.policy)
    if not path.is_file():
        raise FileNotFoundError(f"{path} not found: --policy must be a policy.d3 file")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    if args.sha256 is not None and args.sha256.lower() != digest:
        raise UserError(
            f"{path} has sha256 {digest}, not the {args.sha256} you expected; nothing was trusted"
        )
    store = trust.record(path, digest, "addiffusion offline-rl trust")
    print(f"offline-rl trust: sha256 {digest} of {path} recorded in {store}")
    return 0


def _add_trust_sha256(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "--trust-sha256",
        default=None,
        metavar="HEX",
        help="load the policy if its sha256 is HEX even when neither dvc.lock nor the trust "
        "store records it (a hash you checked against its publisher's)",
    )


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "offline-rl",
        help="train the jump/stop/refine policy offline (discrete IQL; CQL/BC/BCQ baselines)",
        description="Offline RL on a built dataset with d3rlpy. `train` (dvc.yaml's offline_rl "
        "stage) fits the algorithms of the params file (discrete IQL and the CQL / BC / BCQ "
        "baselines, one params section each, handed to d3rlpy), per seed, with a checkpoint per "
        "epoch and FQE of each on the validation split; `verify`, `trust`, `export-onnx` "
        "and `fqe` (off-policy evaluation) are helpers for a trained policy.d3. A .d3 file is a pickle: it is loaded "
        "only when the project's dvc.lock records it as a stage output or its sha256 is in the "
        "trust store (which `train` and `trust` write; $ADDIFFUSION_TRUST_STORE, default "
        "$XDG_DATA_HOME/addiffusion/trusted.json).",
    )
    stage = parser.add_subparsers(dest="offline_rl_command", required=True, metavar="<command>")

    p = stage.add_parser(
        "train",
        help="train on a built dataset with a rewards file",
        description="Convert the dataset to d3rlpy replay buffers (validation prompts: the "
        "split recorded by `datasets build` in meta/info.json; offline_rl.action_space and "
        "offline_rl.drop_observations ablations applied), train the `offline_rl.algo` of "
        "the params file and each of `offline_rl.baselines` (their sections offline_rl.<algo> "
        "go to d3rlpy as they are) once per seed of offline_rl.seeds, and write policy.d3, "
        "manifest.json, checkpoints/<step>/, ope.json (FQE of every checkpoint on the "
        "validation split, offline_rl.fqe), metrics.json, training.csv, d3rlpy logs, "
        "baselines/<algo>/ and seeds/<seed>/ under --out; each policy.d3's sha256 is added to "
        "the trust store.",
    )
    p.add_argument("--dataset", required=True, help="dataset folder (from `datasets build`)")
    p.add_argument("--rewards", required=True, help="rewards file (from `datasets relabel`)")
    p.add_argument("--out", required=True, help="output folder")
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default: %(default)s = torch's choice)",
    )
    p.add_argument("--quiet", action="store_true", help="no progress bars and no d3rlpy info logs")
    p.set_defaults(func=_train)

    f = stage.add_parser(
        "fqe",
        help="off-policy evaluation of the trained policies with Fitted Q Evaluation",
        description="Estimate how much return each policy of an `offline-rl train` run (the "
        "main one and its baselines, loaded only when trusted) would get, without running it: "
        "d3rlpy's DiscreteFQE fits the Q function of the policy's greedy (unmasked) action on "
        "the validation prompts (the split `offline-rl train` uses) and reports its value at "
        "the recorded trajectories' first states, next to the behaviour data's observed "
        "discounted return. Writes JSON; changes no pipeline output.",
    )
    f.add_argument("--dataset", required=True, help="dataset folder (from `datasets build`)")
    f.add_argument("--rewards", required=True, help="rewards file (from `datasets relabel`)")
    f.add_argument(
        "--offline", required=True, help="output folder of `offline-rl train` (policy.d3 ...)"
    )
    f.add_argument(
        "--out",
        default=None,
        help="JSON file to write (default: <offline>/fqe.json; the offline_rl stage's own "
        "estimates are <offline>/ope.json)",
    )
    f.add_argument(
        "--fit-on",
        choices=["val", "train"],
        default="val",
        help="transitions FQE is fitted on; its estimate is always on the validation "
        "trajectories (default: %(default)s)",
    )
    f.add_argument(
        "--n-steps", type=int, default=2000, help="FQE gradient steps (default: %(default)s)"
    )
    f.add_argument(
        "--batch-size", type=int, default=256, help="FQE batch size (default: %(default)s)"
    )
    f.add_argument(
        "--learning-rate",
        type=float,
        default=1e-3,
        help="FQE Adam learning rate (default: %(default)s)",
    )
    f.add_argument(
        "--target-update-interval",
        type=int,
        default=100,
        help="FQE steps between target-network syncs (default: %(default)s)",
    )
    f.add_argument("--seed", type=int, default=0, help="d3rlpy seed (default: %(default)s)")
    f.add_argument(
        "--threads",
        type=int,
        default=0,
        help="torch CPU threads (default: %(default)s = torch's choice)",
    )
    f.set_defaults(func=_fqe)

    v = stage.add_parser(
        "verify",
        help="check a policy.d3 against its manifest and load it",
        description="Check that --policy is trusted (dvc.lock or the trust store records its "
        "hash) and that its sha256 is the one recorded in the manifest.json its training run "
        "wrote, then load it and print its algo, observation dim, action count and action names "
        "as JSON. A .d3 file is a pickle: otherwise nothing is loaded and the exit status is 2.",
    )
    v.add_argument("--policy", required=True, help="policy.d3 file")
    v.add_argument("--manifest", default=None, help="manifest.json (default: beside the policy)")
    _add_trust_sha256(v)
    v.set_defaults(func=_verify)

    o = stage.add_parser(
        "export-onnx",
        help="write a trained policy (iql, cql, bc, bcq) as an ONNX graph",
        description="Load --policy (only when trusted and matching its manifest) and write an ONNX "
        "graph that acts like it: inputs obs (B, D) float32 (raw observations) and mask (B, n) "
        "bool, outputs action (B,) int64 (the greedy legal action) and scores (B, n) float32. "
        "The action table is in the model's metadata. Needs the onnx package; run the graph "
        "with onnxruntime. (d3rlpy's own save_policy('x.onnx') fails under this torch.)",
    )
    o.add_argument("--policy", required=True, help="policy.d3 file")
    o.add_argument("--manifest", default=None, help="manifest.json (default: beside the policy)")
    _add_trust_sha256(o)
    o.add_argument(
        "--out", default=None, help="ONNX file to write (default: the policy's path with .onnx)"
    )
    o.set_defaults(func=_export_onnx)

    t = stage.add_parser(
        "trust",
        help="trust a policy.d3 you checked (adds its sha256 to the trust store)",
        description="Record the sha256 of --policy in the trust store, so that eval, "
        "online-finetune, policy export and the other commands will load it. A .d3 file is a "
        "pickle and runs code when loaded: trust only files whose source you trust, ideally "
        "checked against a published hash with --sha256. Store: $ADDIFFUSION_TRUST_STORE, "
        "default $XDG_DATA_HOME/addiffusion/trusted.json (~/.local/share/...).",
    )
    t.add_argument("policy", help="policy.d3 file")
    t.add_argument(
        "--sha256", default=None, metavar="HEX", help="refuse unless the file's sha256 is HEX"
    )
    t.set_defaults(func=_trust)
