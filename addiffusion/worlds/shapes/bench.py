"""``addiffusion bench shapes``: verifier accuracy per tier vs DDIM step count, and CLIP retrieval.

Held-out prompts (tiers cycling simple, medium, complex) are generated with one fixed seed per
prompt, so every step count starts from the same noise and the comparison is paired. The tiny
CLIP's text->image top-1 retrieval is measured among 64 held-out renders (a hit is a render whose
caption is the query caption). Two rows explain where accuracy is lost: the *VAE ceiling* (accuracy
of the held-out renders passed through the VAE alone, the best the UNet could reach) and the
fraction of relations satisfied at the largest step count. The last line sums it up:
``shapes: simple@50=<a> medium@50=<b> complex@50=<c> all@4=<d> all@50=<e> clip_top1=<f>``.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from addiffusion.worlds.shapes.captions import CATEGORIES, sample_prompts
from addiffusion.worlds.shapes.scenes import render
from addiffusion.worlds.shapes.verifier import verify


@dataclass(frozen=True)
class ShapesBench:
    """``accuracy[tier][steps]`` (tier also "all"), ``score`` the same for the partial score;
    ``vae_ceiling[tier]`` the accuracy of VAE round trips of the renders, ``relations[tier]`` the
    fraction of relations satisfied at the largest step count."""

    steps: tuple[int, ...]
    accuracy: dict[str, dict[int, float]]
    score: dict[str, dict[int, float]]
    vae_ceiling: dict[str, float]
    relations: dict[str, float]
    clip_top1: float
    n_prompts: int
    guidance_scale: float
    seconds: float


def generate(
    pipe, prompts: list[str], steps: int, guidance: float, seed: int, batch: int = 32
) -> np.ndarray:
    """``(N, 32, 32, 3)`` uint8 images, prompt i seeded with ``seed + i`` (same noise at any steps)."""
    out = []
    for start in range(0, len(prompts), batch):
        chunk = prompts[start : start + batch]
        gens = [torch.Generator().manual_seed(seed + start + i) for i in range(len(chunk))]
        images = pipe(
            chunk,
            num_inference_steps=steps,
            guidance_scale=guidance,
            generator=gens,
            height=32,
            width=32,
            output_type="np",
        ).images
        out.append(np.clip(np.round(images * 255.0), 0, 255).astype(np.uint8))
    return np.concatenate(out)


@torch.no_grad()
def vae_round_trip(pipe, images: np.ndarray) -> np.ndarray:
    """``(N, H, W, 3)`` uint8 renders encoded and decoded by the pipeline's VAE, as uint8."""
    x = torch.from_numpy(images).to(pipe.device).permute(0, 3, 1, 2).float() / 127.5 - 1.0
    out = pipe.vae.decode(pipe.vae.encode(x).latent_dist.mean).sample
    out = ((out.clamp(-1.0, 1.0) + 1.0) * 127.5).round().byte()
    return out.permute(0, 2, 3, 1).cpu().numpy()


@torch.no_grad()
def clip_retrieval_top1(clip_dir: str, n: int = 64, seed: int = 0) -> float:
    """Text->image top-1 among ``n`` held-out renders with the shapes CLIP (open_clip local-dir)."""
    from addiffusion.rewards.clip import ClipScorer

    scorer = ClipScorer(clip_dir)
    prompts = sample_prompts("heldout", n, seed + 10_000)
    images = torch.from_numpy(np.stack([render(p.scene) for p in prompts])).permute(0, 3, 1, 2)
    img = scorer.encode_images(images.float() / 255.0)
    txt = scorer.encode_text([p.text for p in prompts])
    best = (txt @ img.T).argmax(dim=1).tolist()
    return float(np.mean([prompts[j].text == prompts[i].text for i, j in enumerate(best)]))


def run_bench(
    model_dir: Path,
    n_prompts: int,
    steps: tuple[int, ...],
    guidance: float,
    seed: int,
    device: str = "auto",
) -> tuple[ShapesBench, np.ndarray, list[str]]:
    """Run the benchmark; also returns the images at the largest step count and their captions."""
    from addiffusion.diffusion.backbone import load_pipeline

    t0 = time.monotonic()
    pipe = load_pipeline(str(model_dir / "pipeline"), scheduler="ddim", device=device)
    prompts = sample_prompts("heldout", n_prompts, seed)
    texts = [p.text for p in prompts]
    cats = np.array([p.category for p in prompts])
    acc: dict[str, dict[int, float]] = {c: {} for c in (*CATEGORIES, "all")}
    score: dict[str, dict[int, float]] = {c: {} for c in (*CATEGORIES, "all")}
    sel = {c: np.ones(len(texts), bool) if c == "all" else cats == c for c in acc}

    def mean(values: np.ndarray, c: str) -> float:
        return float(values[sel[c]].mean()) if sel[c].any() else float("nan")

    last = np.zeros((0, 32, 32, 3), np.uint8)
    for s in sorted(steps):
        last = generate(pipe, texts, s, guidance, seed)
        res = verify(last, texts)
        for c in acc:
            acc[c][s] = mean(res.correct, c)
            score[c][s] = mean(res.score, c)
    relations = {c: mean(res.relations, c) for c in acc}
    renders = np.stack([render(p.scene) for p in prompts])
    ceiling = verify(vae_round_trip(pipe, renders), texts).correct
    vae_ceiling = {c: mean(ceiling, c) for c in acc}
    top1 = clip_retrieval_top1(str(model_dir / "clip"), seed=seed)
    bench = ShapesBench(
        tuple(steps),
        acc,
        score,
        vae_ceiling,
        relations,
        top1,
        n_prompts,
        guidance,
        time.monotonic() - t0,
    )
    return bench, last, texts


def format_table(b: ShapesBench) -> str:
    head = "tier      " + "".join(f"{s:>8d}" for s in b.steps)
    rows = [
        f"verifier accuracy (correct) per tier vs DDIM steps, guidance {b.guidance_scale}, "
        f"{b.n_prompts} held-out prompts",
        head,
    ]
    for c in (*CATEGORIES, "all"):
        rows.append(f"{c:<10}" + "".join(f"{b.accuracy[c][s]:8.3f}" for s in b.steps))
    rows.append("partial score (all)  " + " ".join(f"{b.score['all'][s]:.3f}" for s in b.steps))
    tiers = (*CATEGORIES, "all")
    rows.append(
        "VAE ceiling (renders through the VAE alone): "
        + " ".join(f"{c}={b.vae_ceiling[c]:.3f}" for c in tiers)
    )
    rows.append(
        f"relations satisfied at {max(b.steps)} steps: "
        + " ".join(f"{c}={b.relations[c]:.3f}" for c in tiers)
    )
    rows.append(f"clip text->image top-1 among 64 held-out renders: {b.clip_top1:.3f}")
    hi = max(b.steps)
    lo = 4 if 4 in b.steps else min(b.steps)
    rows.append(
        f"shapes: simple@{hi}={b.accuracy['simple'][hi]:.3f} medium@{hi}={b.accuracy['medium'][hi]:.3f} "
        f"complex@{hi}={b.accuracy['complex'][hi]:.3f} all@{lo}={b.accuracy['all'][lo]:.3f} "
        f"all@{hi}={b.accuracy['all'][hi]:.3f} clip_top1={b.clip_top1:.3f}"
    )
    return "\n".join(rows)


def save_grid(
    images: np.ndarray, captions: list[str], path: Path, rows: int = 4, cols: int = 8
) -> None:
    """A ``rows x cols`` grid of samples with their captions (wrapped) as a PNG."""
    import textwrap

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(rows, cols, figsize=(cols * 1.6, rows * 2.0))
    for k, ax in enumerate(axes.flat):
        ax.axis("off")
        if k < len(images):
            ax.imshow(images[k], interpolation="nearest")
            ax.set_title("\n".join(textwrap.wrap(captions[k], 22)), fontsize=5.5)
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _main(args: argparse.Namespace) -> None:
    from addiffusion.config import read_params
    from addiffusion.worlds.shapes.config import ShapesConfig

    torch.set_num_threads(args.threads)
    cfg = (
        ShapesConfig.from_params(read_params(args.params))
        if Path(args.params).exists()
        else ShapesConfig()
    )
    steps = tuple(args.steps) if args.steps else cfg.bench_steps
    guidance = args.guidance if args.guidance is not None else cfg.guidance_scale
    n = args.n_prompts if args.n_prompts is not None else cfg.bench_prompts
    model_dir = Path(args.model_dir)
    if not (model_dir / "pipeline" / "model_index.json").exists():
        raise SystemExit(
            f"{model_dir}/pipeline has no model_index.json: train it with "
            f"`addiffusion shapes train --out {model_dir}`"
        )
    bench, images, texts = run_bench(model_dir, n, steps, guidance, args.seed, args.device)
    print(format_table(bench))
    if args.grid:
        save_grid(images[:32], texts[:32], Path(args.grid))
    if args.json:
        Path(args.json).write_text(json.dumps(asdict(bench), indent=2))


def register_bench(bench_sub: argparse._SubParsersAction) -> None:
    p = bench_sub.add_parser(
        "shapes",
        help="shapes world: verifier accuracy vs steps, CLIP top-1",
        description=__doc__,
    )
    p.add_argument("--model-dir", default="assets/shapes", help="folder with pipeline/ and clip/")
    p.add_argument(
        "--n-prompts",
        type=int,
        default=None,
        help="held-out prompts (default: shapes.bench_prompts)",
    )
    p.add_argument(
        "--steps",
        type=int,
        nargs="+",
        default=None,
        help="DDIM step counts (default: shapes.bench_steps)",
    )
    p.add_argument(
        "--guidance", type=float, default=None, help="CFG scale (default: shapes.guidance_scale)"
    )
    p.add_argument("--seed", type=int, default=0, help="prompt sampling and per-prompt noise seed")
    p.add_argument("--params", default="params.yaml", help="params file with a `shapes` section")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    p.add_argument("--grid", default=None, help="write a 4x8 sample grid PNG here")
    p.add_argument("--json", default=None, help="write the results as JSON here")
    p.set_defaults(func=_main)
