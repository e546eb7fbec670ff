"""Model definitions of the shapes world: word-level CLIP tokenizer, tiny SD-format pipeline and
tiny open_clip model, plus their save/load in the layouts diffusers and open_clip read natively.

- Pipeline folder: ``StableDiffusionPipeline.save_pretrained`` layout, loaded with
  ``StableDiffusionPipeline.from_pretrained(path)`` (or the project's ``load_pipeline``).
- CLIP folder: ``open_clip_config.json`` (``{"model_cfg", "preprocess_cfg"}``) +
  ``open_clip_model.safetensors`` + the tokenizer files, loaded with
  ``open_clip.create_model_and_transforms("local-dir:" + path)`` and
  ``open_clip.get_tokenizer("local-dir:" + path)`` (the config names an HF tokenizer, so open_clip
  reads the folder's own ``vocab.json`` / ``merges.txt`` instead of its 49k-token BPE).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import open_clip
import torch
from diffusers import AutoencoderKL, DDIMScheduler, StableDiffusionPipeline, UNet2DConditionModel
from safetensors.torch import save_file
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from addiffusion.worlds.shapes.captions import VOCABULARY

CONTEXT_LENGTH = 24  # tokens incl. start/end; the longest caption of the grammar has 16
_LETTERS = "abcdefghijklmnopqrstuvwxyz"
CLIP_MEAN = [0.5, 0.5, 0.5]
CLIP_STD = [0.5, 0.5, 0.5]


@dataclass(frozen=True)
class ModelSizes:
    """Widths of the shapes models (defaults: ~2.5 M parameters in all)."""

    vae_channels: tuple[int, ...] = (16, 32, 32)  # 3 levels: 32x32 -> 8x8 latents
    latent_channels: int = 4
    unet_channels: tuple[int, ...] = (48, 96)
    unet_layers_per_block: int = 1
    text_width: int = 64
    text_layers: int = 2
    clip_embed_dim: int = 64
    clip_vision_width: int = 64
    clip_vision_layers: int = 3
    clip_text_width: int = 64
    clip_text_layers: int = 2


def _bpe(word: str, ranks: dict[tuple[str, str], int]) -> list[str]:
    """CLIP's byte-pair merge loop on one lowercase word (same algorithm as CLIPTokenizer)."""
    parts = list(word[:-1]) + [word[-1] + "</w>"]
    while len(parts) > 1:
        pairs = [
            (ranks.get((a, b), 1 << 30), i)
            for i, (a, b) in enumerate(zip(parts, parts[1:], strict=False))
        ]
        rank, _ = min(pairs)
        if rank == 1 << 30:
            break
        first, second = next(
            (a, b) for a, b in zip(parts, parts[1:], strict=False) if ranks.get((a, b)) == rank
        )
        merged, i = [], 0
        while i < len(parts):
            if i + 1 < len(parts) and parts[i] == first and parts[i + 1] == second:
                merged.append(first + second)
                i += 2
            else:
                merged.append(parts[i])
                i += 1
        parts = merged
    return parts


def write_tokenizer(out_dir: Path, words: tuple[str, ...] = VOCABULARY) -> CLIPTokenizer:
    """Write ``vocab.json`` + ``merges.txt`` so every grammar word is one token, and load them.

    Merges are added word by word after simulating BPE with the merges so far, so a later word's
    merges can never split an earlier word. Single letters stay in the vocabulary: any lowercase
    text still tokenizes without unknown tokens. ``<|endoftext|>`` gets the largest id because
    open_clip's text tower pools at the argmax token id.
    """
    merges: list[tuple[str, str]] = []
    ranks: dict[tuple[str, str], int] = {}
    for word in words:
        parts = _bpe(word, ranks)
        while len(parts) > 1:
            pair = (parts[0], parts[1])
            if pair not in ranks:
                ranks[pair] = len(merges)
                merges.append(pair)
            parts = [parts[0] + parts[1]] + parts[2:]
    tokens = list(_LETTERS) + [c + "</w>" for c in _LETTERS]
    tokens += [a + b for a, b in merges]
    tokens = list(dict.fromkeys(tokens)) + ["<|startoftext|>", "<|endoftext|>"]
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, indent=0))
    (out_dir / "merges.txt").write_text(
        "#version: 0.2\n" + "".join(f"{a} {b}\n" for a, b in merges)
    )
    # transformers 5: without model_max_length, padding to max length overflows.
    return CLIPTokenizer(
        str(out_dir / "vocab.json"), str(out_dir / "merges.txt"), model_max_length=CONTEXT_LENGTH
    )


def build_scheduler() -> DDIMScheduler:
    """SD's schedule with v-prediction and trailing spacing (few-step DDIM reaches t = T)."""
    return DDIMScheduler(
        num_train_timesteps=1000,
        beta_start=0.00085,
        beta_end=0.012,
        beta_schedule="scaled_linear",
        prediction_type="v_prediction",
        timestep_spacing="trailing",
        clip_sample=False,
        set_alpha_to_one=False,
        steps_offset=1,
    )


def build_pipeline(
    tokenizer: CLIPTokenizer, sizes: ModelSizes, seed: int
) -> StableDiffusionPipeline:
    """A freshly initialised SD-format pipeline for 32x32 images and 8x8x4 latents."""
    torch.manual_seed(seed)
    vocab = tokenizer.get_vocab()
    eos = vocab["<|endoftext|>"]
    text_encoder = CLIPTextModel(
        CLIPTextConfig(
            vocab_size=len(vocab),
            hidden_size=sizes.text_width,
            intermediate_size=sizes.text_width * 2,
            num_hidden_layers=sizes.text_layers,
            num_attention_heads=4,
            max_position_embeddings=CONTEXT_LENGTH,
            bos_token_id=vocab["<|startoftext|>"],
            eos_token_id=eos,
            pad_token_id=eos,
        )
    )
    n = len(sizes.unet_channels)
    unet = UNet2DConditionModel(
        sample_size=8,
        in_channels=sizes.latent_channels,
        out_channels=sizes.latent_channels,
        block_out_channels=sizes.unet_channels,
        layers_per_block=sizes.unet_layers_per_block,
        down_block_types=("CrossAttnDownBlock2D",) * n,
        up_block_types=("CrossAttnUpBlock2D",) * n,
        cross_attention_dim=sizes.text_width,
        attention_head_dim=16,
        norm_num_groups=16,
    )
    m = len(sizes.vae_channels)
    vae = AutoencoderKL(
        in_channels=3,
        out_channels=3,
        down_block_types=("DownEncoderBlock2D",) * m,
        up_block_types=("UpDecoderBlock2D",) * m,
        block_out_channels=sizes.vae_channels,
        latent_channels=sizes.latent_channels,
        layers_per_block=1,
        norm_num_groups=16,
        sample_size=32,
    )
    return StableDiffusionPipeline(
        vae=vae,
        text_encoder=text_encoder,
        tokenizer=tokenizer,
        unet=unet,
        scheduler=build_scheduler(),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )


def clip_config(vocab_size: int, sizes: ModelSizes) -> dict[str, Any]:
    """open_clip ``model_cfg`` of the shapes CLIP (ViT on 32x32, 4x4 patches)."""
    return {
        "embed_dim": sizes.clip_embed_dim,
        "vision_cfg": {
            "image_size": 32,
            "patch_size": 4,
            "width": sizes.clip_vision_width,
            "layers": sizes.clip_vision_layers,
            "head_width": 32,
        },
        "text_cfg": {
            "context_length": CONTEXT_LENGTH,
            "vocab_size": vocab_size,
            "width": sizes.clip_text_width,
            "heads": 4,
            "layers": sizes.clip_text_layers,
            # Any non-empty name makes open_clip use an HF tokenizer; with the local-dir schema
            # it is read from the model folder itself.
            "hf_tokenizer_name": "shapes-word-bpe",
        },
    }


def preprocess_config() -> dict[str, Any]:
    return {"size": 32, "mean": CLIP_MEAN, "std": CLIP_STD, "interpolation": "bicubic"}


def build_clip(vocab_size: int, sizes: ModelSizes, seed: int) -> open_clip.CLIP:
    torch.manual_seed(seed)
    cfg = clip_config(vocab_size, sizes)
    return open_clip.CLIP(cfg["embed_dim"], cfg["vision_cfg"], cfg["text_cfg"])


def save_clip(
    model: open_clip.CLIP, tokenizer: CLIPTokenizer, sizes: ModelSizes, out_dir: Path
) -> Path:
    """Write the open_clip folder layout (config, safetensors weights, tokenizer files)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    cfg = {"model_cfg": clip_config(len(tokenizer), sizes), "preprocess_cfg": preprocess_config()}
    (out_dir / "open_clip_config.json").write_text(json.dumps(cfg, indent=2))
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()},
        str(out_dir / "open_clip_model.safetensors"),
    )
    tokenizer.save_pretrained(str(out_dir))
    return out_dir


def load_clip(path: Path | str, device: str | torch.device = "cpu") -> tuple[Any, Any, Any]:
    """``(model, preprocess, tokenizer)`` of a saved shapes CLIP, through open_clip's factory."""
    name = f"local-dir:{Path(path)}"
    model, _, preprocess = open_clip.create_model_and_transforms(name, device=device)
    return model.eval(), preprocess, open_clip.get_tokenizer(name)


def ship(src: Path | str, dst: Path | str) -> list[Path]:
    """Copy ``src/{pipeline,clip,preview}`` to ``dst`` with float16 weights (half the size in git).

    diffusers' and open_clip's loaders cast the weights back into the float32 models they build,
    so loading code needs no special case. Returns the written weight files.
    """
    import shutil

    from safetensors.torch import load_file

    src, dst = Path(src), Path(dst)
    written = []
    for part in ("pipeline", "clip", "preview"):
        if part == "preview" and not (src / part).is_dir():
            continue  # a run from before the preview phase
        if not (src / part).is_dir():
            raise FileNotFoundError(
                f"{src / part} not found: train first (addiffusion shapes train)"
            )
        if (dst / part).exists():
            shutil.rmtree(dst / part)
        shutil.copytree(src / part, dst / part)
        for f in sorted((dst / part).rglob("*.safetensors")):
            sd = load_file(str(f))
            save_file(
                {k: v.half() if v.is_floating_point() else v for k, v in sd.items()},
                str(f),
                metadata={"format": "pt"},
            )
            written.append(f)
    return written
