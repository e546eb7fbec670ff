"""ImageReward on transformers' BLIP: a tiny checkpoint in ImageReward's own key layout, loaded
through the real loading path (no Hub, no real weights)."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import BlipTextConfig, BlipVisionConfig

from addiffusion.rewards import imagereward as ir
from addiffusion.rewards.imagereward import (
    ImageRewardModel,
    ImageRewardScorer,
    imagereward_to_hf_key,
    load_imagereward,
    to_imagereward_state_dict,
)

WORDS = ["a", "red", "blue", "green", "circle", "square", "left", "of", "two", "three"]
TEXT_HEADS = 4  # not the transformers default (8): proves med_config.json is read
VISION_HEADS = 2  # head counts are not in the weights' shapes: the loader is told (ViT-L: 16)


def _write_checkpoint(root: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    """A tiny ImageReward-format checkpoint folder: ImageReward.pt, med_config.json, tokenizer."""
    tok_dir = root / "tokenizer"
    tok_dir.mkdir(parents=True)
    (tok_dir / "vocab.txt").write_text(
        "\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n"
    )
    vocab = 5 + len(WORDS) + 2  # + [DEC] and [ENC], as BLIP's init_tokenizer adds
    vision = BlipVisionConfig(
        hidden_size=48,  # differs from the text width: exercises the cross-attention key width
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=VISION_HEADS,
        image_size=32,
        patch_size=8,
        layer_norm_eps=1e-6,
        initializer_range=0.02,
    )
    text = BlipTextConfig(
        vocab_size=vocab,
        hidden_size=32,
        encoder_hidden_size=48,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=TEXT_HEADS,
        max_position_embeddings=40,
        is_decoder=True,
    )
    torch.manual_seed(0)
    model = ImageRewardModel(vision, text, head_widths=(16, 8, 4, 2))
    sd = to_imagereward_state_dict(model)
    # Keys the real checkpoint carries that scoring does not use (BLIP_Pretrain's projections and
    # med.py's persistent position_ids buffer), with their real shapes relative to the widths.
    sd["blip.vision_proj.weight"] = torch.randn(16, 48)
    sd["blip.vision_proj.bias"] = torch.randn(16)
    sd["blip.text_proj.weight"] = torch.randn(16, 32)
    sd["blip.text_proj.bias"] = torch.randn(16)
    sd["blip.text_encoder.embeddings.position_ids"] = torch.arange(40).expand(1, -1)
    ckpt = root / "ckpt"
    ckpt.mkdir()
    torch.save(sd, ckpt / "ImageReward.pt")
    med = {
        "architectures": ["BertModel"],
        "hidden_size": 32,
        "num_attention_heads": TEXT_HEADS,
        "num_hidden_layers": 2,
        "intermediate_size": 64,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
        "max_position_embeddings": 40,
        "pad_token_id": 0,
        "vocab_size": vocab,
        "encoder_width": 32,  # BLIP_Pretrain overrides it with the ViT width; so do we
        "add_cross_attention": True,
    }
    (ckpt / "med_config.json").write_text(json.dumps(med))
    return root, sd


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, torch.Tensor]]:
    torch.set_num_threads(1)
    return _write_checkpoint(tmp_path_factory.mktemp("imagereward"))


@pytest.fixture(scope="module")
def scorer(tiny: tuple[Path, dict[str, torch.Tensor]]) -> ImageRewardScorer:
    root, _ = tiny
    return ImageRewardScorer(
        str(root / "ckpt"), "cpu", tokenizer=str(root / "tokenizer"), vision_heads=VISION_HEADS
    )


def _images(seed: int, n: int = 3) -> np.ndarray:
    # Not square: exercises the shorter-side resize and the centre crop.
    return np.random.default_rng(seed).integers(0, 256, (n, 40, 56, 3), dtype=np.uint8)


# ImageReward's own key names (read off the original ImageReward/models/BLIP vit.py + med.py and
# ImageReward.py module tree) and where transformers' BLIP keeps the same weight.
ORIGINAL_VISION = {
    "cls_token": "embeddings.class_embedding",
    "pos_embed": "embeddings.position_embedding",
    "patch_embed.proj.weight": "embeddings.patch_embedding.weight",
    "patch_embed.proj.bias": "embeddings.patch_embedding.bias",
    "blocks.{i}.norm1.weight": "encoder.layers.{i}.layer_norm1.weight",
    "blocks.{i}.norm1.bias": "encoder.layers.{i}.layer_norm1.bias",
    "blocks.{i}.attn.qkv.weight": "encoder.layers.{i}.self_attn.qkv.weight",
    "blocks.{i}.attn.qkv.bias": "encoder.layers.{i}.self_attn.qkv.bias",
    "blocks.{i}.attn.proj.weight": "encoder.layers.{i}.self_attn.projection.weight",
    "blocks.{i}.attn.proj.bias": "encoder.layers.{i}.self_attn.projection.bias",
    "blocks.{i}.norm2.weight": "encoder.layers.{i}.layer_norm2.weight",
    "blocks.{i}.norm2.bias": "encoder.layers.{i}.layer_norm2.bias",
    "blocks.{i}.mlp.fc1.weight": "encoder.layers.{i}.mlp.fc1.weight",
    "blocks.{i}.mlp.fc1.bias": "encoder.layers.{i}.mlp.fc1.bias",
    "blocks.{i}.mlp.fc2.weight": "encoder.layers.{i}.mlp.fc2.weight",
    "blocks.{i}.mlp.fc2.bias": "encoder.layers.{i}.mlp.fc2.bias",
    "norm.weight": "post_layernorm.weight",
    "norm.bias": "post_layernorm.bias",
}
ORIGINAL_TEXT = (
    [
        "embeddings.word_embeddings.weight",
        "embeddings.position_embeddings.weight",
        "embeddings.LayerNorm.weight",
        "embeddings.LayerNorm.bias",
    ]
    + [
        f"encoder.layer.{{i}}.{block}.{p}"
        for block in ("attention", "crossattention")
        for p in (
            "self.query.weight",
            "self.query.bias",
            "self.key.weight",
            "self.key.bias",
            "self.value.weight",
            "self.value.bias",
            "output.dense.weight",
            "output.dense.bias",
            "output.LayerNorm.weight",
            "output.LayerNorm.bias",
        )
    ]
    + [
        "encoder.layer.{i}.intermediate.dense.weight",
        "encoder.layer.{i}.intermediate.dense.bias",
        "encoder.layer.{i}.output.dense.weight",
        "encoder.layer.{i}.output.dense.bias",
        "encoder.layer.{i}.output.LayerNorm.weight",
        "encoder.layer.{i}.output.LayerNorm.bias",
    ]
)
ORIGINAL_HEAD = [f"mlp.layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias")]


def _expand(template: str, n_layers: int = 2) -> list[str]:
    return [template.format(i=i) for i in range(n_layers)] if "{i}" in template else [template]


def test_checkpoint_has_imagereward_key_names(tiny: tuple[Path, dict[str, torch.Tensor]]) -> None:
    _, sd = tiny
    expected = {"blip.text_encoder.embeddings.position_ids", *ORIGINAL_HEAD}
    expected |= {f"blip.{m}_proj.{p}" for m in ("vision", "text") for p in ("weight", "bias")}
    for template in ORIGINAL_VISION:
        expected |= {"blip.visual_encoder." + k for k in _expand(template)}
    for template in ORIGINAL_TEXT:
        expected |= {"blip.text_encoder." + k for k in _expand(template)}
    assert set(sd) == expected
    for original, hf in ORIGINAL_VISION.items():
        for o, h in zip(_expand(original), _expand(hf), strict=True):
            assert imagereward_to_hf_key("blip.visual_encoder." + o) == ("vision", h)


def test_every_checkpoint_key_is_consumed(tiny: tuple[Path, dict[str, torch.Tensor]]) -> None:
    root, sd = tiny
    unused = {k for k in sd if imagereward_to_hf_key(k) is None}
    assert unused == {
        "blip.vision_proj.weight",
        "blip.vision_proj.bias",
        "blip.text_proj.weight",
        "blip.text_proj.bias",
        "blip.text_encoder.embeddings.position_ids",
    }
    # strict: raises on a missing or unexpected key
    model = load_imagereward(str(root / "ckpt" / "ImageReward.pt"), vision_heads=VISION_HEADS)
    assert model.text.config.num_attention_heads == TEXT_HEADS
    assert model.vision.config.num_attention_heads == VISION_HEADS
    assert model.vision.config.image_size == 32
    assert model.text.config.encoder_hidden_size == 48
    reloaded = to_imagereward_state_dict(model)
    assert set(reloaded) == set(sd) - unused  # nothing missing, nothing extra
    for key, value in reloaded.items():
        torch.testing.assert_close(value, sd[key], rtol=0, atol=0, msg=key)


def test_scores_finite_deterministic_and_conditional(scorer: ImageRewardScorer) -> None:
    images = _images(0)
    # The last prompt is longer than ImageReward's 35 tokens: truncated, as the original does.
    prompts = ["a red circle", "two blue squares", "a green square left of a red circle " * 6]
    s1 = scorer(images, prompts)
    assert s1.shape == (3,) and s1.dtype == np.float32
    assert np.isfinite(s1).all()
    np.testing.assert_array_equal(s1, scorer(images, prompts))
    other_prompts = scorer(images, ["three green circles"] * 3)
    assert np.abs(other_prompts - s1).min() > 1e-6
    other_images = scorer(_images(1), prompts)
    assert np.abs(other_images - s1).min() > 1e-6
    # Batch composition does not change a row's score.
    np.testing.assert_allclose(scorer(images[:1], prompts[:1]), s1[:1], rtol=1e-5, atol=1e-6)


def test_missing_or_unknown_key_is_an_error(
    tiny: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    root, sd = tiny
    (tmp_path / "med_config.json").write_text((root / "ckpt" / "med_config.json").read_text())
    broken = dict(sd)
    del broken["blip.text_encoder.encoder.layer.1.crossattention.self.value.bias"]
    torch.save(broken, tmp_path / "ImageReward.pt")
    with pytest.raises(KeyError, match=r"crossattention\.self\.value\.bias"):
        load_imagereward(str(tmp_path))
    extra = dict(sd)
    extra["blip.itm_head.weight"] = torch.zeros(2, 32)
    torch.save(extra, tmp_path / "ImageReward.pt")
    with pytest.raises(KeyError, match=r"blip\.itm_head\.weight"):
        load_imagereward(str(tmp_path))


def test_med_config_that_disagrees_with_weights_is_an_error(
    tiny: tuple[Path, dict[str, torch.Tensor]], tmp_path: Path
) -> None:
    root, _ = tiny
    (tmp_path / "med_config.json").write_text(json.dumps({"hidden_size": 768}))
    with pytest.raises(ValueError, match="med_config hidden_size is 768.*32"):
        load_imagereward(str(root / "ckpt"), med_config=str(tmp_path / "med_config.json"))


def test_hub_id_downloads_checkpoint_and_med_config(
    tiny: tuple[Path, dict[str, torch.Tensor]], monkeypatch: pytest.MonkeyPatch
) -> None:
    root, _ = tiny
    calls = []

    def fake_download(repo_id: str, filename: str) -> str:
        calls.append((repo_id, filename))
        return str(root / "ckpt" / filename)

    monkeypatch.setattr(ir, "hf_hub_download", fake_download)
    load_imagereward("THUDM/ImageReward")
    assert calls == [
        ("THUDM/ImageReward", "ImageReward.pt"),
        ("THUDM/ImageReward", "med_config.json"),
    ]


def test_bad_inputs_are_errors(scorer: ImageRewardScorer) -> None:
    with pytest.raises(ValueError, match="uint8"):
        scorer(_images(0).astype(np.float32), ["a", "b", "c"])
    with pytest.raises(ValueError, match="3 images but 2 prompts"):
        scorer(_images(0), ["a", "b"])
