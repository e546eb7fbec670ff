"""The built-in shapes world: scenes, captions, exact verifier, tiny SD pipeline and CLIP.

Public API (numpy/scipy only; the model code lives in ``models`` / ``train`` / ``bench``)::

    sample_prompts(split, n, seed) -> list[Prompt]      # split: "train" | "heldout"
    verify(images (B, H, W, 3) uint8, captions) -> VerifierResult (.score, .correct, ...)
"""

from addiffusion.worlds.shapes.captions import Prompt, parse_caption, sample_prompts
from addiffusion.worlds.shapes.scenes import Scene, render
from addiffusion.worlds.shapes.verifier import VerifierResult, verify

__all__ = [
    "Prompt",
    "Scene",
    "VerifierResult",
    "parse_caption",
    "render",
    "sample_prompts",
    "verify",
]
