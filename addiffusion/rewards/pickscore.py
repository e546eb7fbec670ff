"""PickScore (Kirstain et al., NeurIPS 2023, https://github.com/yuvalkirstain/PickScore).

A CLIP-H/14 fine-tuned on Pick-a-Pic human preferences, in transformers format: model
``yuvalkirstain/PickScore_v1`` with the processor of the CLIP it started from,
``laion/CLIP-ViT-H-14-laion2B-s32B-b79K``. Score of an (image, prompt) pair, as in the
authors' reference code: ``logit_scale.exp() * cos(image_embeds, text_embeds)`` (CLIP's learned temperature, about 100,
times the cosine of the projected embeddings).

Verified here (tests/rewards/test_pickscore.py, offline): a tiny ``CLIPModel`` and a processor
(hand-written tokenizer + ``CLIPImageProcessor``) saved with ``save_pretrained`` load through the
same ``from_pretrained`` calls and give finite, deterministic, prompt-dependent scores equal to
the formula above. Not verified: the real weights (no Hub access here).
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from transformers import CLIPModel, CLIPProcessor

MODEL = "yuvalkirstain/PickScore_v1"
PROCESSOR = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"


class PickScoreScorer:
    """Extra scorer ``(images (B, H, W, 3) uint8, prompts) -> (B,) float32`` PickScore.

    ``model`` / ``processor``: Hub ids or local folders written by ``save_pretrained``.
    """

    def __init__(
        self,
        model: str = MODEL,
        processor: str = PROCESSOR,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> None:
        self.device = torch.device(device)
        self.processor = CLIPProcessor.from_pretrained(processor)
        self.model = CLIPModel.from_pretrained(model, dtype=dtype).eval().to(self.device)
        # The reference code truncates at 77 tokens, CLIP's text context.
        self.max_length = int(self.model.config.text_config.max_position_embeddings)

    @torch.no_grad()
    def __call__(self, images: np.ndarray, prompts: Sequence[str]) -> np.ndarray:
        if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
            raise ValueError(
                f"images must be (B, H, W, 3) uint8, got {images.shape} {images.dtype}"
            )
        if len(prompts) != len(images):
            raise ValueError(f"got {len(images)} images but {len(prompts)} prompts")
        pixels = self.processor(images=list(images), return_tensors="pt").pixel_values
        text = self.processor(
            text=list(prompts),
            padding=True,
            truncation=True,
            max_length=self.max_length,
            return_tensors="pt",
        ).to(self.device)
        image_embeds = self.model.get_image_features(
            pixel_values=pixels.to(self.device, self.model.dtype)
        ).pooler_output
        text_embeds = self.model.get_text_features(
            input_ids=text.input_ids, attention_mask=text.attention_mask
        ).pooler_output
        cosine = (
            F.normalize(image_embeds.float(), dim=-1) * F.normalize(text_embeds.float(), dim=-1)
        ).sum(-1)
        scores = self.model.logit_scale.exp().float() * cosine
        return scores.cpu().numpy().astype(np.float32)
