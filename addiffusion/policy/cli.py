"""``addiffusion generate`` (one prompt through a trained policy) and ``addiffusion policy export``
(a trained policy as a package folder)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def _generate(args: argparse.Namespace) -> int:
    import torch

    from addiffusion.policy.generate import filmstrip, generate, load_adaptive, write_trace

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    try:
        adaptive = load_adaptive(
            args.policy, args.model, args.device, args.dtype, args.scorer, args.preview
        )
    except (ValueError, OSError) as e:
        # A package that does not fit, a missing folder or model: the user's to fix.
        print(f"addiffusion generate: error: {e}", file=sys.stderr)
        return 2
    result = generate(
        adaptive,
        args.prompt,
        seed=args.seed,
        negative_prompt=args.negative_prompt,
        guidance_scale=args.guidance_scale,
        keep_frames=args.filmstrip is not None,
    )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    result.image.save(out)
    t = result.trace
    print(
        f"generate: {t.nfe} NFE (the pipeline's default: {result.default_steps} steps = "
        f"{result.default_steps} NFE, {result.default_steps / max(t.nfe, 1):.1f}x more); "
        f"stopped at grid point {t.stop_step} of {adaptive.settings.n_max}; "
        f"actions {' '.join(t.actions)}; {t.seconds:.2f} s; wrote {out}"
    )
    if args.trace is not None:
        write_trace(result, Path(args.trace), {"policy": str(args.policy), "image": str(out)})
        print(f"generate: wrote the trace to {args.trace}")
    if args.filmstrip is not None:
        filmstrip(t, Path(args.filmstrip))
        print(f"generate: wrote the filmstrip to {args.filmstrip}")
    return 0


def _export(args: argparse.Namespace) -> int:
    from addiffusion.policy.export import export_policy

    method, package = export_policy(
        Path(args.dataset),
        Path(args.out),
        offline_dir=Path(args.offline) if args.offline else None,
        online_dir=Path(args.online) if args.online else None,
        eval_dir=Path(args.eval) if args.eval else None,
        method=args.method,
    )
    ev = package.config.evaluation
    gain = (ev.get("frontier") or {}).get("gain")
    note = f" (eval: NFE {ev['nfe']:.2f}, gain vs frontier {gain:+.4f})" if gain is not None else ""
    print(f"policy export: wrote the {method} policy{note} to {args.out}")
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    g = sub.add_parser(
        "generate",
        help="generate an image with a trained policy over a stock diffusers pipeline",
        description=(
            "Generate one image of PROMPT with a policy package (a folder written by "
            "`addiffusion policy export` or AdaptivePolicy.save_pretrained, or a Hub repo id) "
            "driving the stock pipeline it was trained for (or --model). The policy picks the "
            "schedule: it jumps along its solver's grid, stops when it judges the image done and "
            "may refine under-generated regions. Prints the NFE used against the pipeline's "
            "default step count. The starting noise is torch.Generator().manual_seed(SEED)'s, "
            "as in diffusers."
        ),
    )
    g.add_argument("prompt", help="the text prompt")
    g.add_argument("--policy", required=True, help="policy package: folder or Hub repo id")
    g.add_argument(
        "--model",
        default=None,
        help="diffusers pipeline folder or Hub id (default: the backbone the policy was trained on)",
    )
    g.add_argument(
        "--scorer",
        default=None,
        help="open_clip scorer of the observations: folder, hf-hub:org/repo or name@pretrained "
        "(default: the one the policy was trained with)",
    )
    g.add_argument(
        "--preview",
        default=None,
        help="preview decoder of the observations (AutoencoderTiny folder or Hub id), for a "
        "policy trained on preview observations (default: the one it was trained with)",
    )
    g.add_argument("--seed", type=int, default=0, help="noise seed (default: %(default)s)")
    g.add_argument("--out", default="out.png", help="image file to write (default: %(default)s)")
    g.add_argument("--negative-prompt", default=None, help="negative prompt (default: none)")
    g.add_argument(
        "--guidance-scale",
        type=float,
        default=None,
        help="classifier-free guidance (default: the policy's training value)",
    )
    g.add_argument("--trace", default=None, metavar="JSON", help="write the per-decision trace")
    g.add_argument(
        "--filmstrip",
        default=None,
        metavar="PNG",
        help="write x̂0 at every decision with the action taken",
    )
    g.add_argument("--device", default="auto", help="auto | cpu | cuda[:N] (default: %(default)s)")
    g.add_argument(
        "--dtype",
        default="float32",
        choices=("float32", "float16", "bfloat16"),
        help="pipeline dtype",
    )
    g.add_argument("--threads", type=int, default=0, help="torch CPU threads (0 = torch's choice)")
    g.set_defaults(func=_generate)

    p = sub.add_parser(
        "policy",
        help="policy packages: export a trained policy",
        description=(
            "Policy packages: a trained policy as a folder (config.json + model.safetensors + "
            "a model card) that AdaptivePolicy.from_pretrained, `addiffusion generate` and the "
            "drop-in AdaptiveDiffusionPipeline read, and that push_to_hub shares."
        ),
    )
    psub = p.add_subparsers(dest="policy_command", required=True, metavar="<command>")
    e = psub.add_parser(
        "export",
        help="write a trained policy as a package folder (config.json + safetensors + card)",
        description=(
            "Package a trained policy for use outside the pipeline: config.json (action table, "
            "observation layout, scorer, backbone and solver, sampler settings, normalisation "
            "stats), model.safetensors (no pickle) and a model card README.md with the training "
            "data and eval numbers. The .d3 files are loaded only after their sha256 matches "
            "their training run's manifest, and the package is checked to compute what the "
            "policy computes before it is written. Default method: the best learned policy of "
            "the eval (metrics.json's frontier.method)."
        ),
    )
    e.add_argument("--dataset", required=True, help="built dataset the policy was trained on")
    e.add_argument("--offline", default=None, help="offline-rl output folder (iql, cql, bc, bcq)")
    e.add_argument(
        "--online",
        default=None,
        help="online-finetune output folder (ppo; ppo-scratch: its scratch/)",
    )
    e.add_argument(
        "--eval", default=None, help="eval output folder (metrics.json): picks the policy"
    )
    e.add_argument(
        "--method",
        default=None,
        choices=("iql", "cql", "bc", "bcq", "ppo", "ppo-scratch"),
        help="which policy (default: the eval's best learned one)",
    )
    e.add_argument("--out", default="models/policy", help="package folder (default: %(default)s)")
    e.set_defaults(func=_export)
