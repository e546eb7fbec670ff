"""PickScore through the real ``from_pretrained`` path on a tiny CLIP saved locally (offline)."""

from __future__ import annotations

import json
import string
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import (
    CLIPConfig,
    CLIPImageProcessor,
    CLIPModel,
    CLIPProcessor,
    CLIPTokenizer,
)

from addiffusion.rewards.pickscore import PickScoreScorer

CONTEXT = 16


def _write_tiny(root: Path) -> tuple[Path, Path]:
    """``(model folder, processor folder)`` in the layout of the Hub repos PickScore uses."""
    chars = string.ascii_lowercase + string.digits + string.punctuation
    tokens = ["<|startoftext|>", "<|endoftext|>"] + list(chars) + [c + "</w>" for c in chars]
    src = root / "tokenizer_src"
    src.mkdir(parents=True)
    (src / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}))
    (src / "merges.txt").write_text("#version: 0.2\n")
    # transformers 5: without model_max_length, padding to max length overflows.
    tokenizer = CLIPTokenizer(
        str(src / "vocab.json"), str(src / "merges.txt"), model_max_length=CONTEXT
    )
    image_processor = CLIPImageProcessor(
        size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32}
    )
    # Written separately, as the laion repo has them (preprocessor_config.json + tokenizer files),
    # not as one processor_config.json.
    processor_dir = root / "processor"
    image_processor.save_pretrained(processor_dir)
    tokenizer.save_pretrained(processor_dir)
    config = CLIPConfig(
        text_config={
            "vocab_size": len(tokenizer),
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "max_position_embeddings": CONTEXT,
            "bos_token_id": 0,
            "eos_token_id": 1,
            "pad_token_id": 1,
        },
        vision_config={
            "hidden_size": 32,
            "intermediate_size": 64,
            "num_hidden_layers": 2,
            "num_attention_heads": 2,
            "image_size": 32,
            "patch_size": 8,
        },
        projection_dim=16,
    )
    torch.manual_seed(0)
    model_dir = root / "model"
    CLIPModel(config).save_pretrained(model_dir)
    return model_dir, processor_dir


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    torch.set_num_threads(1)
    return _write_tiny(tmp_path_factory.mktemp("pickscore"))


@pytest.fixture(scope="module")
def scorer(tiny: tuple[Path, Path]) -> PickScoreScorer:
    model_dir, processor_dir = tiny
    return PickScoreScorer(str(model_dir), str(processor_dir), "cpu")


def _images(seed: int, n: int = 3) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (n, 40, 56, 3), dtype=np.uint8)


PROMPTS = ["a red circle", "two blue squares", "a green square left of a red circle, " * 3]


def test_scores_finite_deterministic_and_conditional(scorer: PickScoreScorer) -> None:
    images = _images(0)
    s1 = scorer(images, PROMPTS)  # the last prompt is longer than the context: truncated
    assert s1.shape == (3,) and s1.dtype == np.float32
    assert np.isfinite(s1).all()
    np.testing.assert_array_equal(s1, scorer(images, PROMPTS))
    assert np.abs(scorer(images, ["three green circles"] * 3) - s1).min() > 1e-6
    assert np.abs(scorer(_images(1), PROMPTS) - s1).min() > 1e-6


def test_score_is_clip_logit_of_each_pair(scorer: PickScoreScorer, tiny: tuple[Path, Path]) -> None:
    """Same numbers as CLIP's own forward: the diagonal of ``logits_per_image``."""
    model_dir, processor_dir = tiny
    images = _images(2)
    processor = CLIPProcessor.from_pretrained(str(processor_dir))
    inputs = processor(
        text=PROMPTS,
        images=list(images),
        padding=True,
        truncation=True,
        max_length=CONTEXT,
        return_tensors="pt",
    )
    with torch.no_grad():
        logits = CLIPModel.from_pretrained(str(model_dir)).eval()(**inputs).logits_per_image
    np.testing.assert_allclose(scorer(images, PROMPTS), logits.diag().numpy(), rtol=1e-5)


def test_bad_inputs_are_errors(scorer: PickScoreScorer) -> None:
    with pytest.raises(ValueError, match="uint8"):
        scorer(_images(0).astype(np.float32), PROMPTS)
    with pytest.raises(ValueError, match="3 images but 1 prompts"):
        scorer(_images(0), PROMPTS[:1])
