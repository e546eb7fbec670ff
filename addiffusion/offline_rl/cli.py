"""``addiffusion offline-rl``: train the offline policy (and baselines); verify, trust or export
a trained one."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

from addiffusion.config import read_params
from addiffusion.offline_rl.config import OfflineRLConfig


def _train(args: argparse.Namespace) -> int:
    import torch

    from addiffusion.datasets.d3rlpy_convert import to_replay_buffers
    from addiffusion.offline_rl.train import train_offline
    from addiffusion.task import read_info, read_task

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    cfg = OfflineRLConfig.from_params(read_params(args.params))
    # Validation prompts: the split `datasets build` recorded in meta/info.json (its column
    # rl_split), so every stage agrees on which prompts the policy never saw.
    split = read_info(Path(args.dataset)).get("rl_split")
    if not isinstance(split, dict) or not {"val_fraction", "seed"} <= set(split):
        raise SystemExit(
            f"{Path(args.dataset) / 'meta' / 'info.json'} has no rl_split "
            "{val_fraction, seed}: rebuild the dataset with `addiffusion datasets build`"
        )
    train, val = to_replay_buffers(
        Path(args.dataset), Path(args.rewards), float(split["val_fraction"]), int(split["seed"])
    )
    task = read_task(Path(args.dataset))
    metrics = train_offline(
        train,
        val,
        cfg,
        Path(args.out),
        actions=task.actions,
        observer=task.observer,
        show_progress=not args.quiet,
    )
    rows = [(cfg.algo, metrics), *metrics.get("baselines", {}).items()]
    for name, m in rows:
        stop = (m.get("val") or {}).get("stop") or {}
        print(
            f"offline-rl {name}: {m['n_steps']} steps, val stop regret "
            f"{stop.get('regret', float('nan')):.4f}, mean stop step "
            f"{stop.get('mean_stop_step', float('nan')):.2f} "
            f"(oracle {stop.get('oracle_stop_step', float('nan')):.2f})"
        )
    print(f"offline-rl: wrote {Path(args.out) / 'policy.d3'} and its manifest.json")
    return 0


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
        help="train the jump/stop/refine policy offline (discrete IQL; CQL/BC baselines)",
        description="Offline RL on a built dataset with d3rlpy. `train` (dvc.yaml's offline_rl "
        "stage) fits discrete IQL and the CQL / BC baselines; `verify`, `trust` and "
        "`export-onnx` are helpers for a trained policy.d3. A .d3 file is a pickle: it is loaded "
        "only when the project's dvc.lock records it as a stage output or its sha256 is in the "
        "trust store (which `train` and `trust` write; $ADDIFFUSION_TRUST_STORE, default "
        "$XDG_DATA_HOME/addiffusion/trusted.json).",
    )
    stage = parser.add_subparsers(dest="offline_rl_command", required=True, metavar="<command>")

    p = stage.add_parser(
        "train",
        help="train on a built dataset with a rewards file",
        description="Convert the dataset to d3rlpy replay buffers (validation prompts: the "
        "split recorded by `datasets build` in meta/info.json), train the `offline_rl.algo` of "
        "the params file and each of `offline_rl.baselines`, and write policy.d3, "
        "manifest.json, metrics.json, training.csv and d3rlpy logs under --out; each policy.d3's "
        "sha256 is added to the trust store.",
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
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    p.set_defaults(func=_train)

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
        help="write a trained policy (iql, cql, bc) as an ONNX graph",
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
