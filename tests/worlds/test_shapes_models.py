"""Tokenizer coverage, pipeline save/load round trip, open_clip custom config and checkpoints."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import pytest
import torch
from diffusers import StableDiffusionPipeline
from shapes_tiny_sizes import TINY

from addiffusion.worlds.shapes.captions import VOCABULARY, sample_prompts
from addiffusion.worlds.shapes.models import (
    CONTEXT_LENGTH,
    build_clip,
    build_pipeline,
    clip_config,
    load_clip,
    save_clip,
    write_tokenizer,
)


@pytest.fixture(scope="module")
def tokenizer(tmp_path_factory):
    return write_tokenizer(tmp_path_factory.mktemp("tok"))


def test_every_grammar_word_is_one_known_token(tokenizer) -> None:
    vocab = tokenizer.get_vocab()
    for word in VOCABULARY:
        pieces = tokenizer.tokenize(word)
        assert len(pieces) == 1 and pieces[0] in vocab, (word, pieces)
    eos = vocab["<|endoftext|>"]
    assert eos == max(vocab.values())  # open_clip pools at the argmax id
    for p in sample_prompts("heldout", 90, 0):
        assert all(t in vocab for t in tokenizer.tokenize(p.text)), p.text
        ids = tokenizer(p.text)["input_ids"]
        assert len(ids) == len(p.text.split()) + 2 <= CONTEXT_LENGTH
        assert eos not in ids[1:-1]  # the unknown token would be <|endoftext|>
    padded = tokenizer(["a red circle"], padding="max_length", max_length=CONTEXT_LENGTH)
    assert len(padded["input_ids"][0]) == CONTEXT_LENGTH


def test_pipeline_save_load_round_trip(tokenizer, tmp_path: Path) -> None:
    pipe = build_pipeline(tokenizer, TINY, seed=0)
    pipe.set_progress_bar_config(disable=True)
    kwargs = dict(num_inference_steps=2, guidance_scale=3.0, height=32, width=32, output_type="np")
    before = pipe(
        ["a red circle", "two blue squares"], generator=torch.Generator().manual_seed(0), **kwargs
    ).images
    pipe.save_pretrained(tmp_path / "pipe")
    loaded = StableDiffusionPipeline.from_pretrained(tmp_path / "pipe")
    loaded.set_progress_bar_config(disable=True)
    after = loaded(
        ["a red circle", "two blue squares"], generator=torch.Generator().manual_seed(0), **kwargs
    ).images
    assert after.shape == (2, 32, 32, 3)
    np.testing.assert_allclose(before, after, atol=1e-5)
    assert loaded.scheduler.config.prediction_type == "v_prediction"
    assert loaded.tokenizer.model_max_length == CONTEXT_LENGTH


def test_open_clip_custom_config_and_checkpoint(tokenizer, tmp_path: Path) -> None:
    model = build_clip(len(tokenizer), TINY, seed=0).eval()
    folder = save_clip(model, tokenizer, TINY, tmp_path / "clip")
    # 1. The folder layout, through open_clip's local-dir schema (config + weights + tokenizer).
    loaded, preprocess, tok = load_clip(folder)
    ids = tok(["a red circle left of a blue square"])
    assert ids.shape == (1, CONTEXT_LENGTH)
    with torch.no_grad():
        np.testing.assert_allclose(model.encode_text(ids), loaded.encode_text(ids), atol=1e-6)
        x = torch.rand(2, 3, 32, 32)
        np.testing.assert_allclose(model.encode_image(x), loaded.encode_image(x), atol=1e-5)
    # 2. A registered custom config name + the checkpoint as `pretrained`.
    cfg_file = tmp_path / "shapes-clip-test.json"
    cfg_file.write_text(json.dumps(clip_config(len(tokenizer), TINY)))
    open_clip.add_model_config(cfg_file)
    named, _, _ = open_clip.create_model_and_transforms(
        "shapes-clip-test", pretrained=str(folder / "open_clip_model.safetensors")
    )
    with torch.no_grad():
        np.testing.assert_allclose(model.encode_text(ids), named.eval().encode_text(ids), atol=1e-6)
