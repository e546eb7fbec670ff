"""ImageReward (Xu et al., NeurIPS 2023, https://github.com/THUDM/ImageReward) on transformers' BLIP.

The ``image-reward`` 1.5 package cannot be installed beside this project (it pins
``timm==0.6.13``, imports ``clip`` through ``pkg_resources`` and does not import under
transformers 5). Its model is a standard BLIP, so we load its checkpoint into transformers' BLIP
modules instead:

* ``blip.visual_encoder`` (BLIP ViT-L/16, 224 px, pre-norm blocks, LayerNorm eps 1e-6)
  -> :class:`transformers.BlipVisionModel` (the same layout as transformers' own BLIP conversion
  script: ``blocks`` -> ``encoder.layers``, ``attn.proj`` -> ``self_attn.projection``,
  ``norm1/2`` -> ``layer_norm1/2``, ``norm`` -> ``post_layernorm``, ``cls_token`` /
  ``pos_embed`` / ``patch_embed.proj`` -> ``embeddings.*``; the fused ``qkv`` has the same
  ``(3, heads, head_dim)`` row order in both).
* ``blip.text_encoder`` (BLIP's med.py ``BertModel`` with cross-attention, no pooler)
  -> :class:`transformers.BlipTextModel` built with ``is_decoder=True`` (which is what creates
  the cross-attention layers) and run with ``is_decoder=False`` (bidirectional self-attention,
  as med.py's default). Key names are identical.
* ``mlp.layers.{0,2,4,6,7}`` -> :class:`ImageRewardHead`, the same ``nn.Sequential`` (linear
  layers with dropouts between them and, as in the original, no activations).
* Not used for scoring, consumed and dropped: ``blip.vision_proj.*`` and ``blip.text_proj.*``
  (BLIP's contrastive projections) and ``blip.text_encoder.embeddings.position_ids`` (a buffer).
  Any other key, or any key the modules need but the checkpoint lacks, is an error.

Score = ``(head(text_encoder(prompt, cross-attending to ViT(image))[CLS]) - mean) / std`` with
ImageReward's constants; prompts are tokenised by BERT ``bert-base-uncased`` (+ ``[DEC]`` and
``[ENC]`` added, as BLIP's ``init_tokenizer`` does, giving its 30524-word vocabulary), padded to
35 tokens; images are resized (shorter side, bicubic) and centre-cropped to 224 and normalised with
CLIP's mean/std.

What is verified here (tests/rewards/test_imagereward.py, offline): the mapping against a table of
the original key names; a tiny state dict with those names, built from tiny transformers modules
through the inverse mapping, loads with no missing or unexpected keys and gives finite, deterministic, prompt- and image-dependent scores; the
Hub wiring asks for ``ImageReward.pt`` and ``med_config.json`` from ``THUDM/ImageReward``.
Checked once by hand (not in the test suite: it needs the original source, patched to import
under transformers 5): a tiny model built from the original ``ImageReward/models/BLIP`` vit.py +
med.py + ``MLP`` classes has exactly the keys this mapping expects plus the 5 unused ones, loads
strictly, and these modules give bit-identical scores for the same weights and inputs; at full
size (ViT-L + BERT-base + head) the format has 620 mapped + 5 unused keys, 447 M parameters.
Not verified here: the real checkpoint (no Hub access), so its exact key set and the published
model's scores are untested. Head counts are not in the weights' shapes: the text encoder's come
from ``med_config.json`` (12), the ViT's from ``vision_heads`` (16 for ViT-L). Known difference
from the original: resizing runs in torch (bicubic, antialiased) instead of PIL on uint8; on
512 px images the normalised pixels differ by ~0.004 on average (max ~0.05).
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from huggingface_hub import hf_hub_download
from torch import nn
from transformers import (
    BertTokenizer,
    BlipTextConfig,
    BlipTextModel,
    BlipVisionConfig,
    BlipVisionModel,
)

HUB_REPO = "THUDM/ImageReward"
CHECKPOINT_FILE = "ImageReward.pt"
MED_CONFIG_FILE = "med_config.json"
TOKENIZER = "google-bert/bert-base-uncased"
# ImageReward/ImageReward.py: the reward's mean and std over its training set.
REWARD_MEAN = 0.16717362830052426
REWARD_STD = 1.0333394966054072
MAX_LENGTH = 35
VISION_HEADS = 16  # BLIP ViT-L (blip.py create_vit): not recoverable from weight shapes
CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
# med_config.json of THUDM/ImageReward (BLIP's configs/med_config.json): what shapes cannot tell.
MED_CONFIG_DEFAULTS = {
    "num_attention_heads": 12,
    "layer_norm_eps": 1e-12,
    "hidden_act": "gelu",
    "pad_token_id": 0,
}
UNUSED_KEYS = re.compile(
    r"blip\.(vision_proj|text_proj)\.(weight|bias)|blip\.text_encoder\.embeddings\.position_ids"
)

# (ImageReward name, BlipVisionModel name) under "blip.visual_encoder." ; inverse is unambiguous.
_VISION_RENAMES = [
    (r"cls_token", "embeddings.class_embedding"),
    (r"pos_embed", "embeddings.position_embedding"),
    (r"patch_embed\.proj\.(weight|bias)", r"embeddings.patch_embedding.\1"),
    (r"blocks\.(\d+)\.norm1\.(weight|bias)", r"encoder.layers.\1.layer_norm1.\2"),
    (r"blocks\.(\d+)\.norm2\.(weight|bias)", r"encoder.layers.\1.layer_norm2.\2"),
    (r"blocks\.(\d+)\.attn\.qkv\.(weight|bias)", r"encoder.layers.\1.self_attn.qkv.\2"),
    (r"blocks\.(\d+)\.attn\.proj\.(weight|bias)", r"encoder.layers.\1.self_attn.projection.\2"),
    (r"blocks\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"encoder.layers.\1.mlp.\2.\3"),
    (r"norm\.(weight|bias)", r"post_layernorm.\1"),
]
_VISION_INVERSE = [
    (r"embeddings\.class_embedding", "cls_token"),
    (r"embeddings\.position_embedding", "pos_embed"),
    (r"embeddings\.patch_embedding\.(weight|bias)", r"patch_embed.proj.\1"),
    (r"encoder\.layers\.(\d+)\.layer_norm1\.(weight|bias)", r"blocks.\1.norm1.\2"),
    (r"encoder\.layers\.(\d+)\.layer_norm2\.(weight|bias)", r"blocks.\1.norm2.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.qkv\.(weight|bias)", r"blocks.\1.attn.qkv.\2"),
    (r"encoder\.layers\.(\d+)\.self_attn\.projection\.(weight|bias)", r"blocks.\1.attn.proj.\2"),
    (r"encoder\.layers\.(\d+)\.mlp\.(fc1|fc2)\.(weight|bias)", r"blocks.\1.mlp.\2.\3"),
    (r"post_layernorm\.(weight|bias)", r"norm.\1"),
]
_PARTS = {"vision": "blip.visual_encoder.", "text": "blip.text_encoder.", "head": "mlp."}


def _rename(name: str, table: list[tuple[str, str]]) -> str | None:
    for pattern, repl in table:
        if re.fullmatch(pattern, name):
            return re.sub(f"^{pattern}$", repl, name)
    return None


def imagereward_to_hf_key(key: str) -> tuple[str, str] | None:
    """ImageReward checkpoint key -> ``(part, key in that module)``, part in vision/text/head.

    ``None`` for keys that scoring does not use (see the module docstring); ``KeyError`` for a key
    that is neither.
    """
    if UNUSED_KEYS.fullmatch(key):
        return None
    if key.startswith(_PARTS["text"]):
        return "text", key.removeprefix(_PARTS["text"])
    if key.startswith(_PARTS["head"]):
        return "head", key.removeprefix(_PARTS["head"])
    if key.startswith(_PARTS["vision"]):
        new = _rename(key.removeprefix(_PARTS["vision"]), _VISION_RENAMES)
        if new is not None:
            return "vision", new
    raise KeyError(f"ImageReward checkpoint key {key!r} has no counterpart in the BLIP modules")


def hf_to_imagereward_key(part: str, key: str) -> str:
    """Inverse of :func:`imagereward_to_hf_key` (used to write ImageReward-format checkpoints)."""
    if part == "vision":
        new = _rename(key, _VISION_INVERSE)
        if new is None:
            raise KeyError(f"BlipVisionModel key {key!r} has no ImageReward counterpart")
        return _PARTS["vision"] + new
    if part not in _PARTS:
        raise KeyError(f"part must be one of {sorted(_PARTS)}, got {part!r}")
    return _PARTS[part] + key


class ImageRewardHead(nn.Module):
    """ImageReward's ``MLP``: ``(B, D) -> (B, 1)``. Same ``layers`` indices as the original so
    the checkpoint's ``mlp.layers.N`` keys load unchanged; like the original, no activations."""

    def __init__(self, in_features: int = 768, widths: Sequence[int] = (1024, 128, 64, 16)) -> None:
        super().__init__()
        w = [in_features, *widths]
        self.layers = nn.Sequential(
            nn.Linear(w[0], w[1]),
            nn.Dropout(0.2),
            nn.Linear(w[1], w[2]),
            nn.Dropout(0.2),
            nn.Linear(w[2], w[3]),
            nn.Dropout(0.1),
            nn.Linear(w[3], w[4]),
            nn.Linear(w[4], 1),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(x)


class ImageRewardModel(nn.Module):
    """BLIP ViT + BLIP text encoder (cross-attention) + MLP head; see the module docstring."""

    def __init__(
        self,
        vision_config: BlipVisionConfig,
        text_config: BlipTextConfig,
        head_widths: Sequence[int] = (1024, 128, 64, 16),
    ) -> None:
        super().__init__()
        self.vision = BlipVisionModel(vision_config)
        self.text = BlipTextModel(text_config, add_pooling_layer=False)
        self.head = ImageRewardHead(text_config.hidden_size, head_widths)

    def forward(
        self, pixel_values: torch.Tensor, input_ids: torch.Tensor, attention_mask: torch.Tensor
    ) -> torch.Tensor:
        """``pixel_values: (B, 3, S, S)`` normalised, ``input_ids / attention_mask: (B, L)`` ->
        ``(B,)`` float32 reward, standardised with ImageReward's mean/std."""
        image_embeds = self.vision(pixel_values=pixel_values).last_hidden_state
        # No encoder_attention_mask: ImageReward passes all ones, i.e. attend to every patch.
        text = self.text(
            input_ids=input_ids,
            attention_mask=attention_mask,
            encoder_hidden_states=image_embeds,
            is_decoder=False,
        )
        reward = self.head(text.last_hidden_state[:, 0, :].float()).squeeze(-1)
        return (reward - REWARD_MEAN) / REWARD_STD


def to_imagereward_state_dict(model: ImageRewardModel) -> dict[str, torch.Tensor]:
    """The model's weights under ImageReward's key names (without the unused keys)."""
    out = {}
    for part in ("vision", "text", "head"):
        for key, value in getattr(model, part).state_dict().items():
            out[hf_to_imagereward_key(part, key)] = value
    return out


def _count(sd: Mapping[str, torch.Tensor], pattern: str) -> int:
    return len({m.group(1) for k in sd if (m := re.fullmatch(pattern, k))})


def _need(sd: Mapping[str, torch.Tensor], key: str, where: str) -> torch.Tensor:
    if key not in sd:
        raise KeyError(f"{where}: ImageReward checkpoint has no key {key!r}")
    return sd[key]


def configs_from_state_dict(
    sd: Mapping[str, torch.Tensor],
    med_config: Mapping[str, object],
    vision_heads: int = VISION_HEADS,
    where: str = "checkpoint",
) -> tuple[BlipVisionConfig, BlipTextConfig, list[int]]:
    """Module configs from the checkpoint's shapes (sizes, depths, vocabulary, image size) and
    ``med_config`` (heads, eps, activation): ``(vision, text, head widths)``."""
    v, t = _PARTS["vision"], _PARTS["text"]
    hidden = _need(sd, v + "cls_token", where).shape[-1]
    patch = _need(sd, v + "patch_embed.proj.weight", where).shape[-1]
    n_pos = _need(sd, v + "pos_embed", where).shape[1]
    grid = math.isqrt(n_pos - 1)
    if grid * grid != n_pos - 1:
        raise ValueError(f"{where}: {v}pos_embed has {n_pos} positions, expected 1 + a square")
    vision = BlipVisionConfig(
        hidden_size=hidden,
        intermediate_size=_need(sd, v + "blocks.0.mlp.fc1.weight", where).shape[0],
        num_hidden_layers=_count(sd, re.escape(v) + r"blocks\.(\d+)\.norm1\.weight"),
        num_attention_heads=vision_heads,
        image_size=grid * patch,
        patch_size=patch,
        layer_norm_eps=1e-6,  # BLIP vit.py: partial(nn.LayerNorm, eps=1e-6)
        hidden_act="gelu",
    )
    vocab, width = _need(sd, t + "embeddings.word_embeddings.weight", where).shape
    shapes = {
        "vocab_size": vocab,
        "hidden_size": width,
        "num_hidden_layers": _count(
            sd, re.escape(t) + r"encoder\.layer\.(\d+)\.output\.dense\.weight"
        ),
        "intermediate_size": _need(
            sd, t + "encoder.layer.0.intermediate.dense.weight", where
        ).shape[0],
        "max_position_embeddings": _need(
            sd, t + "embeddings.position_embeddings.weight", where
        ).shape[0],
    }
    for key, got in shapes.items():
        if key in med_config and med_config[key] != got:
            raise ValueError(
                f"{where}: med_config {key} is {med_config[key]}, but the checkpoint's weights "
                f"have {got}; the config and the checkpoint do not belong together"
            )
    extra = {k: med_config.get(k, d) for k, d in MED_CONFIG_DEFAULTS.items()}
    text = BlipTextConfig(
        **shapes,
        **extra,
        encoder_hidden_size=_need(
            sd, t + "encoder.layer.0.crossattention.self.key.weight", where
        ).shape[1],
        is_decoder=True,  # creates the cross-attention layers; forward runs bidirectionally
        hidden_dropout_prob=0.0,
        attention_probs_dropout_prob=0.0,
    )
    widths = [_need(sd, f"mlp.layers.{i}.weight", where).shape[0] for i in (0, 2, 4, 6)]
    return vision, text, widths


def resolve_checkpoint(checkpoint: str) -> tuple[Path, Path | None]:
    """``checkpoint``: an ``ImageReward.pt`` file, a folder holding one, or a Hub repo id
    (``THUDM/ImageReward``). Returns the weights file and its ``med_config.json`` if any."""
    path = Path(checkpoint)
    if path.is_dir():
        path = path / CHECKPOINT_FILE
        if not path.is_file():
            raise FileNotFoundError(f"ImageReward folder {checkpoint} has no {CHECKPOINT_FILE}")
    if path.is_file():
        med = path.parent / MED_CONFIG_FILE
        return path, med if med.is_file() else None
    if path.exists() or checkpoint.count("/") != 1:
        raise FileNotFoundError(
            f"ImageReward checkpoint {checkpoint!r} is neither a file, a folder with "
            f"{CHECKPOINT_FILE}, nor a Hub repo id like {HUB_REPO!r}"
        )
    weights = hf_hub_download(repo_id=checkpoint, filename=CHECKPOINT_FILE)
    med = hf_hub_download(repo_id=checkpoint, filename=MED_CONFIG_FILE)
    return Path(weights), Path(med)


def load_imagereward(
    checkpoint: str, med_config: str | None = None, vision_heads: int = VISION_HEADS
) -> ImageRewardModel:
    """Build the modules from the checkpoint and load every weight (strict; see module docstring).

    ``med_config`` overrides the ``med_config.json`` found beside the checkpoint (or on the Hub);
    without either, ImageReward's published values are used.
    """
    weights, found_med = resolve_checkpoint(checkpoint)
    med_path = Path(med_config) if med_config is not None else found_med
    med = json.loads(med_path.read_text()) if med_path is not None else {}
    # weights_only: a checkpoint is untrusted data; ImageReward.pt is a plain state dict.
    sd = torch.load(weights, map_location="cpu", weights_only=True)
    if not isinstance(sd, Mapping) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise ValueError(f"{weights}: expected a state dict (name -> tensor), got {type(sd)}")
    parts: dict[str, dict[str, torch.Tensor]] = {"vision": {}, "text": {}, "head": {}}
    for key, value in sd.items():
        target = imagereward_to_hf_key(key)
        if target is not None:
            parts[target[0]][target[1]] = value
    vision_cfg, text_cfg, widths = configs_from_state_dict(sd, med, vision_heads, str(weights))
    model = ImageRewardModel(vision_cfg, text_cfg, widths)
    for part, tensors in parts.items():
        result = getattr(model, part).load_state_dict(tensors, strict=False)
        if result.missing_keys or result.unexpected_keys:
            missing = [hf_to_imagereward_key(part, k) for k in result.missing_keys]
            raise KeyError(
                f"{weights}: {part} weights do not match the BLIP modules; missing from the "
                f"checkpoint: {missing[:5]}, not expected: {result.unexpected_keys[:5]}"
            )
    return model.eval()


def preprocess(images: np.ndarray, size: int, device: torch.device) -> torch.Tensor:
    """``(B, H, W, 3)`` uint8 -> ``(B, 3, size, size)`` float32: shorter side resized to ``size``
    (bicubic, antialiased), centre crop, CLIP mean/std; ImageReward's transform, in torch."""
    x = torch.from_numpy(np.ascontiguousarray(images)).to(device).permute(0, 3, 1, 2).float() / 255
    h, w = x.shape[-2:]
    scale = size / min(h, w)
    new_hw = (max(size, round(h * scale)), max(size, round(w * scale)))
    x = F.interpolate(x, size=new_hw, mode="bicubic", align_corners=False, antialias=True)
    top, left = (new_hw[0] - size) // 2, (new_hw[1] - size) // 2
    x = x[..., top : top + size, left : left + size].clamp(0, 1)
    mean = torch.tensor(CLIP_MEAN, device=device).view(1, 3, 1, 1)
    std = torch.tensor(CLIP_STD, device=device).view(1, 3, 1, 1)
    return (x - mean) / std


class ImageRewardScorer:
    """Extra scorer ``(images (B, H, W, 3) uint8, prompts) -> (B,) float32`` ImageReward score
    (standardised: 0 is the training-set mean, 1 its std).

    ``checkpoint``: ``THUDM/ImageReward`` (Hub), a folder with ``ImageReward.pt`` (and optionally
    ``med_config.json``) or the ``.pt`` file; ``tokenizer``: BERT tokenizer id or folder.
    """

    def __init__(
        self,
        checkpoint: str = HUB_REPO,
        device: torch.device | str = "cpu",
        tokenizer: str = TOKENIZER,
        med_config: str | None = None,
        vision_heads: int = VISION_HEADS,
    ) -> None:
        self.device = torch.device(device)
        self.model = load_imagereward(checkpoint, med_config, vision_heads).to(self.device)
        # BLIP's init_tokenizer: the two added tokens make the 30524-word vocabulary.
        self.tokenizer = BertTokenizer.from_pretrained(tokenizer)
        self.tokenizer.add_special_tokens({"bos_token": "[DEC]"})
        self.tokenizer.add_special_tokens({"additional_special_tokens": ["[ENC]"]})
        vocab = self.model.text.config.vocab_size
        if len(self.tokenizer) != vocab:
            raise ValueError(
                f"tokenizer {tokenizer!r} has {len(self.tokenizer)} tokens with [DEC] and [ENC] "
                f"added, but the ImageReward checkpoint's vocabulary has {vocab}"
            )
        self.image_size = int(self.model.vision.config.image_size)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"images must be (B, H, W, 3) uint8, got {images.shape} {images.dtype}"
            )
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        tokens = self.tokenizer(
            list(prompts),
            padding="max_length",
            truncation=True,
            max_length=MAX_LENGTH,
            return_tensors="pt",
        ).to(self.device)
        pixels = preprocess(images, self.image_size, self.device)
        dtype = next(self.model.parameters()).dtype
        scores = self.model(pixels.to(dtype), tokens.input_ids, tokens.attention_mask)
        return scores.float().cpu().numpy().astype(np.float32)
