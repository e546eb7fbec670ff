"""CLIP features and CLIP score through open_clip.

A scorer is named like open_clip names models: a local folder (``open_clip_config.json`` +
weights, loaded with open_clip's ``local-dir:`` schema), ``hf-hub:org/repo``, or a built-in
open_clip name with an optional pretrained tag (``ViT-B-32@laion2b_s34b_b79k``).
The built-in random ``tiny`` scorer is written by :func:`save_tiny_clip`. A name that is neither
(a missing folder, a typo) and a folder whose weights cannot be read are a
:class:`~addiffusion.config.UserError` naming it.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import open_clip
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import save_file

from addiffusion.config import UserError

TINY_CLIP_CFG = {
    "embed_dim": 32,
    "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 32},
    "text_cfg": {"context_length": 77, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 2},
}
TINY_PREPROCESS_CFG = {
    "size": 32,
    "mean": [0.48145466, 0.4578275, 0.40821073],
    "std": [0.26862954, 0.26130258, 0.27577711],
}


def save_tiny_clip(out_dir: Path, seed: int) -> Path:
    """Write a randomly initialised tiny open_clip model in open_clip's folder layout."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    model = open_clip.CLIP(**TINY_CLIP_CFG)
    (out_dir / "open_clip_config.json").write_text(
        json.dumps({"model_cfg": TINY_CLIP_CFG, "preprocess_cfg": TINY_PREPROCESS_CFG}, indent=2)
    )
    save_file(
        {k: v.contiguous() for k, v in model.state_dict().items()},
        str(out_dir / "open_clip_model.safetensors"),
    )
    return out_dir


class ClipScorer:
    """Image/text features (L2-normalised) and CLIP score (cosine similarity, in [-1, 1])."""

    def __init__(self, name: str, device: torch.device | str = "cpu") -> None:
        self.name = name
        model_name, pretrained = _open_clip_name(name)
        try:
            model, _, _ = open_clip.create_model_and_transforms(
                model_name, pretrained=pretrained, device=device
            )
        except (SafetensorError, RuntimeError, OSError, EOFError) as e:
            if not model_name.startswith("local-dir:"):
                raise
            weights = sorted(
                str(p) for p in Path(name).iterdir() if p.suffix in (".safetensors", ".bin", ".pt")
            )
            first = (str(e).strip() or type(e).__name__).splitlines()[0]
            raise UserError(
                f"cannot load the scorer's weights {' or '.join(weights) or f'in {name}'} "
                f"({first}): the file is truncated or corrupt; copy or download it again"
            ) from e
        self.model = model.eval()
        self.tokenizer = open_clip.get_tokenizer(model_name)
        cfg = open_clip.get_model_preprocess_cfg(model)
        size = cfg["size"]
        self.image_size = (size, size) if isinstance(size, int) else tuple(size)
        self.device = torch.device(device)
        self.mean = torch.tensor(cfg["mean"], device=self.device).view(1, 3, 1, 1)
        self.std = torch.tensor(cfg["std"], device=self.device).view(1, 3, 1, 1)
        self.dim = (
            int(self.model.text_projection.shape[-1])
            if hasattr(self.model, "text_projection") and self.model.text_projection is not None
            else int(self.encode_text(["x"]).shape[-1])
        )

    @torch.no_grad()
    def encode_text(self, prompts: list[str]) -> torch.Tensor:
        """``(B,)`` prompts -> ``(B, D)`` float32, unit norm."""
        tokens = self.tokenizer(prompts).to(self.device)
        return F.normalize(self.model.encode_text(tokens).float(), dim=-1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        """``images: (B, 3, H, W)`` float in [0, 1] -> ``(B, D)`` float32, unit norm.

        Tensor preprocessing (bicubic resize + normalise) equivalent to open_clip's transform,
        without a round trip through PIL on the sampler's hot path.
        """
        x = images.to(self.device, torch.float32)
        if tuple(x.shape[-2:]) != self.image_size:
            x = F.interpolate(x, size=self.image_size, mode="bicubic", align_corners=False)
        x = (x.clamp(0, 1) - self.mean) / self.std
        return F.normalize(self.model.encode_image(x).float(), dim=-1)


def _open_clip_name(name: str) -> tuple[str, str | None]:
    """open_clip's (model name, pretrained tag) for a scorer name; :class:`UserError` for a
    name that is no folder, Hub id or open_clip model (open_clip would take a path for a model
    name and say only that it has no config for it)."""
    path = Path(name)
    if name.startswith("hf-hub:"):
        return name, None
    if path.is_dir():
        if not (path / "open_clip_config.json").is_file():
            raise UserError(
                f"scorer folder {name} has no open_clip_config.json (write one with "
                "save_tiny_clip, or point collect.scorer at an open_clip folder)"
            )
        return f"local-dir:{name}", None
    model_name, _, pretrained = name.partition("@")
    if model_name not in open_clip.list_models():
        what = "a file, not a folder" if path.exists() else "no such folder"
        raise UserError(
            f"scorer {name!r}: {what}, nor an open_clip model name; set collect.scorer to a "
            "folder with open_clip_config.json, hf-hub:<org>/<repo> or <model>@<pretrained> "
            "(e.g. ViT-B-32@laion2b_s34b_b79k)"
        )
    return model_name, pretrained or None


def clip_score(image_features: torch.Tensor, text_features: torch.Tensor) -> np.ndarray:
    """Cosine similarity per row: ``(B, D), (B, D) -> (B,)``."""
    return (image_features * text_features).sum(-1).cpu().numpy().astype(np.float32)
