"""Before/after evaluation of a distilled student on held-out prompts, at its step count.

The teacher, the pre-distillation student (``<train>/student_init``) and the distilled one
(``<train>/student``) sample every (held-out prompt, seed) from the same noise at the pair's
``n_steps`` shared timesteps. Per image: the teacher-student image MSE (pixels in [0, 1]), the
CLIP similarity to the prompt (:class:`addiffusion.rewards.clip.ClipScorer`) and, on shapes-world
prompts, the exact verifier's verdict; per prompt: diversity across seeds (mean pairwise
``1 - cos`` of CLIP image features). Post minus pre is compared with a prompt-cluster paired
bootstrap (:func:`addiffusion.eval.metrics.paired_bootstrap`). Writes ``metrics.json``,
``report.md`` (the table), ``comparison.png`` and ``items.csv``.
"""

from __future__ import annotations

import csv
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from addiffusion.collect.prompts import PromptRecord
from addiffusion.diffusion import backbone
from addiffusion.distill.config import DistillConfig
from addiffusion.distill.pair import decode, draw_noise, encode, make_pair, sample
from addiffusion.distill.train import split_prompts

MODELS = ("teacher", "pre", "post")
"""Rows of the report: the teacher, the student before and after distillation."""
EVAL_SEED_BASE = 1_000_000
"""Evaluation seeds are ``EVAL_SEED_BASE + k``; training draws its seeds below 2**31 at random,
so the evaluation noise is fixed and the same for every model."""


@dataclass(frozen=True)
class Generated:
    """Images of the three models on N (prompt, seed) items, same order everywhere."""

    prompts: list[PromptRecord]
    """(N,) the prompt of each item"""
    seeds: np.ndarray
    """(N,) int"""
    images: dict[str, np.ndarray]
    """model -> (N, H, W, 3) uint8"""
    features: dict[str, np.ndarray]
    """model -> (N, D) float32 CLIP image features"""
    text_features: np.ndarray
    """(N, D)"""


def heldout_prompts(cfg: DistillConfig) -> list[PromptRecord]:
    prompts = split_prompts(cfg, "heldout")
    return prompts[: cfg.eval_prompts] if cfg.eval_prompts else prompts


def _uint8(images: torch.Tensor) -> np.ndarray:
    return (images.permute(0, 2, 3, 1).cpu().numpy() * 255.0).round().clip(0, 255).astype(np.uint8)


@torch.no_grad()
def generate(cfg: DistillConfig, train_dir: Path, progress: bool = False) -> Generated:
    """Sample teacher, pre- and post-distillation student on the held-out items."""
    from addiffusion.rewards.clip import ClipScorer

    train_dir = Path(train_dir)
    for name in ("student_init", "student"):
        if not (train_dir / name / "model_index.json").is_file():
            raise FileNotFoundError(
                f"{train_dir / name} is not a pipeline folder: run `addiffusion distill train "
                f"--out {train_dir}` first"
            )
    device = str(backbone.resolve_device(cfg.device))
    load = backbone.load_pipeline
    teacher = load(cfg.teacher, cfg.scheduler, device, torch.float32, cfg.drop_components)
    pre = load(
        str(train_dir / "student_init"), cfg.scheduler, device, torch.float32, cfg.drop_components
    )
    post = load(
        str(train_dir / "student"), cfg.scheduler, device, torch.float32, cfg.drop_components
    )
    pairs = {
        name: make_pair(teacher, s, cfg.n_steps, cfg.guidance_scale, cfg.height, cfg.width)
        for name, s in (("pre", pre), ("post", post))
    }
    scorer = ClipScorer(cfg.scorer, device)
    records = heldout_prompts(cfg)
    items = [(p, EVAL_SEED_BASE + k) for p in records for k in range(cfg.eval_seeds)]
    images: dict[str, list[np.ndarray]] = {m: [] for m in MODELS}
    feats: dict[str, list[np.ndarray]] = {m: [] for m in MODELS}
    text_feats = []
    from tqdm.auto import tqdm

    for start in tqdm(
        range(0, len(items), cfg.eval_batch_size), desc="distill eval", disable=not progress
    ):
        chunk = items[start : start + cfg.eval_batch_size]
        texts = [p.text for p, _ in chunk]
        noise = draw_noise(pairs["pre"], [s for _, s in chunk])
        for name in MODELS:
            pair = pairs["post" if name == "post" else "pre"]
            cond = encode(pair, texts)
            which = "teacher" if name == "teacher" else "student"
            img = decode(pair, sample(pair, which, cond, noise))
            images[name].append(_uint8(img))
            feats[name].append(scorer.encode_images(img).cpu().numpy())
        text_feats.append(scorer.encode_text(texts).cpu().numpy())
    return Generated(
        [p for p, _ in items],
        np.asarray([s for _, s in items]),
        {m: np.concatenate(v) for m, v in images.items()},
        {m: np.concatenate(v) for m, v in feats.items()},
        np.concatenate(text_feats),
    )


def diversity(features: np.ndarray, prompt_ids: np.ndarray) -> np.ndarray:
    """Per prompt (in order of first appearance), mean pairwise ``1 - cos`` of the image features
    of its seeds; (P,) float (NaN for a prompt with one seed)."""
    out = []
    for pid in dict.fromkeys(prompt_ids.tolist()):
        f = features[prompt_ids == pid]
        if len(f) < 2:
            out.append(np.nan)
            continue
        sim = f @ f.T
        iu = np.triu_indices(len(f), 1)
        out.append(float(np.mean(1.0 - sim[iu])))
    return np.asarray(out, np.float64)


def score(gen: Generated, cfg: DistillConfig) -> dict[str, Any]:
    """Per-item scores and the before/after comparison (see the module docstring)."""
    from addiffusion.eval.metrics import paired_bootstrap

    ids = np.asarray([p.prompt_id for p in gen.prompts])
    texts = [p.text for p in gen.prompts]
    per: dict[str, dict[str, np.ndarray]] = {m: {} for m in MODELS}
    shapes = cfg.prompts == "shapes"
    for m in MODELS:
        diff = gen.images[m].astype(np.float64) / 255.0 - gen.images["teacher"] / 255.0
        per[m]["image_mse"] = (diff**2).mean(axis=(1, 2, 3))
        per[m]["clip"] = (gen.features[m] * gen.text_features).sum(-1).astype(np.float64)
        if shapes:
            from addiffusion.worlds.shapes.verifier import verify

            per[m]["verifier"] = verify(gen.images[m], texts).correct.astype(np.float64)
    rng = np.random.default_rng(cfg.seed)
    table: dict[str, dict[str, float]] = {}
    for m in MODELS:
        table[m] = {k: float(np.mean(v)) for k, v in per[m].items()}
        table[m]["diversity"] = float(np.nanmean(diversity(gen.features[m], ids)))
    comparison = {}
    for key in per["pre"]:
        comparison[key] = paired_bootstrap(
            per["post"][key], per["pre"][key], ids, cfg.bootstrap_samples, cfg.confidence, rng
        )
    div_pre, div_post = diversity(gen.features["pre"], ids), diversity(gen.features["post"], ids)
    ok = ~(np.isnan(div_pre) | np.isnan(div_post))
    if ok.any():
        pids = np.arange(len(div_pre))[ok]
        comparison["diversity"] = paired_bootstrap(
            div_post[ok], div_pre[ok], pids, cfg.bootstrap_samples, cfg.confidence, rng
        )
    return {
        "n_items": len(gen.prompts),
        "n_prompts": len(set(ids.tolist())),
        "n_steps": cfg.n_steps,
        "confidence": cfg.confidence,
        "table": table,
        "post_minus_pre": comparison,
        "items": per,
    }


def write_report(result: dict[str, Any], gen: Generated, out: Path, train_dir: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    table, comp = result["table"], result["post_minus_pre"]
    metrics = {k: v for k, v in result.items() if k != "items"}
    (out / "metrics.json").write_text(json.dumps(metrics, indent=2))
    cols = [c for c in ("image_mse", "clip", "verifier", "diversity") if c in table["pre"]]
    names = {"teacher": "teacher", "pre": "student, before", "post": "student, after"}
    pct = int(round(result["confidence"] * 100))
    lines = [
        f"# Distillation: before / after ({result['n_prompts']} held-out prompts x "
        f"{result['n_items'] // max(result['n_prompts'], 1)} seeds, {result['n_steps']} steps)",
        "",
        f"Student from `{train_dir}`. image_mse: to the teacher's image from the same noise "
        "(pixels in [0, 1]); clip: CLIP similarity to the prompt; verifier: shapes-verifier "
        "accuracy; diversity: mean pairwise 1 - cos of CLIP image features across seeds.",
        "",
        "| model | " + " | ".join(cols) + " |",
        "|---|" + "---:|" * len(cols),
    ]
    for m in MODELS:
        lines.append(f"| {names[m]} | " + " | ".join(f"{table[m][c]:.4f}" for c in cols) + " |")
    lines += ["", f"Post - pre, prompt-cluster paired bootstrap, {pct}% CI:", ""]
    lines += ["| metric | post - pre | CI low | CI high | p |", "|---|---:|---:|---:|---:|"]
    for c in cols:
        if c in comp:
            d = comp[c]
            lines.append(
                f"| {c} | {d['diff']:+.4f} | {d['ci_low']:+.4f} | {d['ci_high']:+.4f} | "
                f"{d['p']:.4f} |"
            )
    (out / "report.md").write_text("\n".join(lines) + "\n")
    with (out / "items.csv").open("w", newline="") as f:
        w = csv.writer(f)
        keys = list(result["items"]["pre"])
        w.writerow(["prompt_id", "seed", *[f"{m}_{k}" for m in MODELS for k in keys]])
        for n, p in enumerate(gen.prompts):
            w.writerow(
                [p.prompt_id, int(gen.seeds[n])]
                + [f"{result['items'][m][k][n]:.6g}" for m in MODELS for k in keys]
            )
    _plot(table, comp, cols, out / "comparison.png", pct)


def _plot(
    table: dict[str, dict[str, float]], comp: dict[str, Any], cols: list[str], path: Path, pct: int
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(cols), figsize=(3.2 * len(cols), 3.2))
    axes = np.atleast_1d(axes)
    for ax, c in zip(axes, cols, strict=True):
        vals = [table[m][c] for m in MODELS]
        ax.bar(["teacher", "before", "after"], vals, color=["#888888", "#d08a3a", "#3a7dd0"])
        if c in comp:
            d = comp[c]
            lo, hi = table["pre"][c] + d["ci_low"], table["pre"][c] + d["ci_high"]
            ax.errorbar(
                [2],
                [table["post"][c]],
                yerr=[[vals[2] - lo], [hi - vals[2]]],
                color="black",
                capsize=4,
            )
        ax.set_title(c)
    fig.suptitle(f"Student before / after distillation (after: {pct}% CI of post - pre)")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def evaluate(
    cfg: DistillConfig,
    train_dir: Path,
    out: Path,
    survey_dir: Path | None = None,
    key_dir: Path | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Generate, score, write the report (and the survey export when ``survey_dir``)."""
    t0 = time.perf_counter()
    gen = generate(cfg, train_dir, progress)
    result = score(gen, cfg)
    result["seconds"] = time.perf_counter() - t0
    write_report(result, gen, Path(out), Path(train_dir))
    if survey_dir is not None and cfg.survey_pairs:
        from addiffusion.distill.survey import export_survey

        export_survey(
            gen.images["pre"],
            gen.images["post"],
            [(p.prompt_id, p.text) for p in gen.prompts],
            cfg.survey_pairs,
            Path(survey_dir),
            Path(key_dir) if key_dir is not None else Path(survey_dir).parent / "survey_key",
            cfg.seed,
            cfg.survey_image_size,
        )
    return result
