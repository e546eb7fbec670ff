"""Raw reward components beyond the sampler's own CLIP score and stability.

One place maps a component name to its scorer, so collection, online fine-tuning and evaluation
compute a dataset's components the same way: the collector records the names in
``components`` and the model ids in ``extra_scorer_models`` of its shard metadata, and consumers
rebuild the scorers from there.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import torch

from addiffusion.diffusion.sampler import ExtraScorer

SAMPLER_COMPONENTS = ("clip_score", "stability")
"""Computed by the sampler itself."""
EXTRA_COMPONENTS = ("verifier", "imagereward", "pickscore")
"""verifier: the shapes world's exact check; imagereward / pickscore: learned preference models."""
DEFAULT_MODELS = {
    "imagereward": "THUDM/ImageReward",
    "pickscore": "yuvalkirstain/PickScore_v1",
    "pickscore_processor": "laion/CLIP-ViT-H-14-laion2B-s32B-b79K",
}


def build_extra_scorers(
    components: Sequence[str], models: Mapping[str, str], device: torch.device | str
) -> dict[str, ExtraScorer]:
    """Scorers for ``components`` (names outside :data:`SAMPLER_COMPONENTS`), with model ids or
    folders from ``models`` (keys ``imagereward``, ``pickscore``, ``pickscore_processor``)."""
    models = {**DEFAULT_MODELS, **models}
    out: dict[str, ExtraScorer] = {}
    for name in components:
        if name in SAMPLER_COMPONENTS:
            continue
        if name == "verifier":
            from addiffusion.worlds.shapes.verifier import verify

            out[name] = lambda images, prompts: verify(images, list(prompts)).score
        elif name == "imagereward":
            from addiffusion.rewards.imagereward import ImageRewardScorer

            out[name] = ImageRewardScorer(models["imagereward"], device)
        elif name == "pickscore":
            from addiffusion.rewards.pickscore import PickScoreScorer

            out[name] = PickScoreScorer(models["pickscore"], models["pickscore_processor"], device)
        else:
            known = ", ".join(SAMPLER_COMPONENTS + EXTRA_COMPONENTS)
            raise ValueError(f"unknown reward component {name!r} (known: {known})")
    return out
