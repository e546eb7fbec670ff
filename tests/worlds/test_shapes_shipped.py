"""The shipped shapes weights (assets/shapes): more DDIM steps give verifiably better images
(~6 s on one CPU thread, so not marked slow)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from addiffusion.worlds.shapes.captions import sample_prompts
from addiffusion.worlds.shapes.verifier import verify

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "shapes"


@pytest.mark.skipif(
    not (ASSETS / "pipeline" / "model_index.json").exists(), reason="no shipped shapes weights"
)
def test_simple_prompts_50_steps_beat_2_steps() -> None:
    from addiffusion.diffusion.backbone import load_pipeline
    from addiffusion.worlds.shapes.bench import generate

    torch.set_num_threads(1)
    pipe = load_pipeline(str(ASSETS / "pipeline"), scheduler="ddim", device="cpu")
    texts = [p.text for p in sample_prompts("heldout", 48, 0) if p.category == "simple"]
    acc = {s: verify(generate(pipe, texts, s, 4.0, seed=0), texts).score.mean() for s in (2, 50)}
    assert acc[50] > acc[2] + 0.1, acc
    assert acc[50] >= 0.5, acc


@pytest.mark.skipif(
    not (ASSETS / "clip" / "open_clip_config.json").exists(), reason="no shipped shapes CLIP"
)
def test_shipped_clip_loads_and_ranks_the_right_caption_first() -> None:
    from addiffusion.rewards.clip import ClipScorer
    from addiffusion.worlds.shapes.scenes import render

    scorer = ClipScorer(str(ASSETS / "clip"))
    prompts = [p for p in sample_prompts("heldout", 30, 1) if p.category == "simple"]
    images = torch.from_numpy(np.stack([render(p.scene) for p in prompts])).permute(0, 3, 1, 2)
    sim = scorer.encode_text([p.text for p in prompts]) @ scorer.encode_images(images / 255.0).T
    # A hit is an image whose caption is the query (simple captions can repeat).
    hits = [prompts[j].text == p.text for p, j in zip(prompts, sim.argmax(1).tolist(), strict=True)]
    assert np.mean(hits) >= 0.7
