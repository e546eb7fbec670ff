"""``addiffusion bench preview``: how much the preview decoder changes the observed state.

On the ``collect`` backbone, held-out prompts (the collect prompt set's ``heldout`` split) are
denoised along the whole fine grid (stride 1, ``n_max`` points). At every point the one-step
clean prediction x̂0 is decoded twice, by the pipeline's VAE and by the preview decoder
(``collect.preview``), and each image is scored the way an observation is (CLIP score against the
prompt, and every extra component such as the shapes verifier). Prints, over all (episode,
point) pairs and per third of the grid:

* Pearson and Spearman correlation of each component between the two decodes,
* their mean absolute difference, and the cosine between the two CLIP image features,
* the median time of one batched decode by each decoder, and their ratio,

and ends with ``preview_clip_score_pearson=<r> preview_verifier_pearson=<r>``. ``--json`` writes
the numbers. The final image of an episode is always the VAE's, whatever the observations use.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from scipy import stats

from addiffusion.collect.config import CollectConfig


def _corr(a: np.ndarray, b: np.ndarray) -> dict[str, float]:
    if len(a) < 3 or np.std(a) == 0 or np.std(b) == 0:
        return {"pearson": float("nan"), "spearman": float("nan"), "mean_abs_diff": float("nan")}
    return {
        "pearson": float(stats.pearsonr(a, b)[0]),
        "spearman": float(stats.spearmanr(a, b)[0]),
        "mean_abs_diff": float(np.mean(np.abs(a - b))),
    }


def run_preview_bench(cfg: CollectConfig, n_prompts: int, batch: int) -> dict[str, Any]:
    """Observe ``n_prompts`` held-out episodes with both decoders at every grid point (see the
    module docstring); returns ``{"points", "components": {name: {"all", "early", "middle",
    "late"}}, "feature_cosine", "decode_ms": {"vae", "preview"}, "decode_ratio"}``."""
    from addiffusion.collect.collector import build_sampler, plan_episodes
    from addiffusion.diffusion.backbone import decode_latents, load_preview

    specs = [s for s in plan_episodes(cfg) if s.prompt.split == "heldout"][:n_prompts]
    if not specs:
        raise ValueError(
            f"collect.prompts {cfg.prompts!r} gives no held-out prompt (collect.heldout_fraction "
            f"{cfg.heldout_fraction})"
        )
    sampler = build_sampler(dataclasses.replace(cfg, observe_with="vae"))
    preview = load_preview(cfg.preview, sampler.device, sampler.pipe.vae.dtype)
    names = sampler.component_names
    names.remove("stability")
    vals: dict[str, dict[str, list[float]]] = {n: {"vae": [], "preview": []} for n in names}
    steps: list[int] = []
    cosines: list[float] = []
    times: dict[str, list[float]] = {"vae": [], "preview": []}
    one = sampler.table.jump(1)

    def timed(name: str, x0: torch.Tensor, vae: torch.nn.Module | None) -> torch.Tensor:
        if sampler.device.type == "cuda":
            torch.cuda.synchronize(sampler.device)
        tic = time.perf_counter()
        images = decode_latents(sampler.pipe, x0, vae)
        if sampler.device.type == "cuda":
            torch.cuda.synchronize(sampler.device)
        times[name].append(time.perf_counter() - tic)
        return images

    with torch.no_grad():
        for j in range(0, len(specs), batch):
            chunk = specs[j : j + batch]
            prompts = [s.prompt.text for s in chunk]
            episodes, _ = sampler.start(prompts, [s.seed for s in chunk])
            text = torch.stack([ep.text_features for ep in episodes])
            while True:
                x0 = torch.cat([ep.x0 for ep in episodes])
                for name, vae in (("vae", None), ("preview", preview)):
                    _, feats, scores, extra = sampler.score_images(
                        timed(name, x0, vae), text, prompts
                    )
                    vals["clip_score"][name] += scores.tolist()
                    for k, v in extra.items():
                        vals[k][name] += v.tolist()
                    if name == "vae":
                        ref = feats
                    else:
                        cosines += (feats * ref).sum(-1).cpu().tolist()
                steps += [ep.step for ep in episodes]
                if episodes[0].step >= sampler.settings.n_max - 1:
                    break
                sampler.apply(episodes, [one] * len(episodes))
    n_max = sampler.settings.n_max
    step_arr = np.array(steps)
    thirds = {
        "early": step_arr < n_max / 3,
        "middle": (step_arr >= n_max / 3) & (step_arr < 2 * n_max / 3),
        "late": step_arr >= 2 * n_max / 3,
    }
    components = {}
    for n, v in vals.items():
        a, b = np.array(v["vae"]), np.array(v["preview"])
        components[n] = {"all": _corr(a, b)}
        components[n].update({k: _corr(a[m], b[m]) for k, m in thirds.items()})
    decode_ms = {k: 1e3 * statistics.median(v) for k, v in times.items()}
    return {
        "points": len(steps),
        "episodes": len(specs),
        "n_max": n_max,
        "preview": cfg.preview,
        "components": components,
        "feature_cosine": float(np.mean(cosines)),
        "decode_ms": decode_ms,
        "decode_ratio": decode_ms["preview"] / decode_ms["vae"],
    }


def _bench(args: argparse.Namespace) -> int:
    from addiffusion.config import read_params

    torch.set_num_threads(args.threads)
    cfg = CollectConfig.from_params(read_params(args.params))
    if args.device:
        cfg = dataclasses.replace(cfg, device=args.device)
    if args.preview:
        cfg = dataclasses.replace(cfg, preview=args.preview)
    res = run_preview_bench(cfg, args.prompts, args.batch)
    print(
        f"bench preview: model={cfg.model} preview={cfg.preview} {res['episodes']} held-out "
        f"episodes x {res['n_max']} points = {res['points']} observations"
    )
    print(f"  {'component':<12} {'part':<7} {'pearson':>8} {'spearman':>9} {'mean |diff|':>12}")
    for name, parts in res["components"].items():
        for part, c in parts.items():
            print(
                f"  {name:<12} {part:<7} {c['pearson']:8.3f} {c['spearman']:9.3f} "
                f"{c['mean_abs_diff']:12.4f}"
            )
    print(f"  CLIP image features, mean cosine vae vs preview: {res['feature_cosine']:.3f}")
    d = res["decode_ms"]
    print(
        f"  one batched decode: vae {d['vae']:.2f} ms, preview {d['preview']:.2f} ms "
        f"(ratio {res['decode_ratio']:.2f})"
    )
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(res, indent=2) + "\n")
    line = " ".join(
        f"preview_{n}_pearson={parts['all']['pearson']:.3f}"
        for n, parts in res["components"].items()
    )
    print(line)
    return 0


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "preview",
        help="per-step observations: preview decoder vs full VAE (correlation, cost)",
        description=__doc__,
    )
    p.add_argument("--params", default="params.yaml", help="params file")
    p.add_argument("--prompts", type=int, default=48, help="held-out episodes to observe")
    p.add_argument("--batch", type=int, default=16, help="episodes denoised side by side")
    p.add_argument("--preview", default=None, help="preview decoder (default: collect.preview)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: collect.device)")
    p.add_argument("--json", default=None, help="also write the numbers to this JSON file")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.set_defaults(func=_bench)
