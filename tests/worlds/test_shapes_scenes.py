"""Renderer, caption grammar and split invariants of the shapes world."""

from __future__ import annotations

import numpy as np
import pytest
from scipy import ndimage

from addiffusion.worlds.shapes.captions import (
    CaptionError,
    caption_of,
    parse_caption,
    sample_prompts,
)
from addiffusion.worlds.shapes.scenes import BACKGROUND, COLORS, HELDOUT_PAIRS, render


@pytest.fixture(scope="module")
def prompts():
    return sample_prompts("train", 150, 0) + sample_prompts("heldout", 150, 0)


def test_sample_prompts_is_deterministic_and_splits_differ() -> None:
    a, b = sample_prompts("heldout", 12, 3), sample_prompts("heldout", 12, 3)
    assert [p.text for p in a] == [p.text for p in b]
    assert a[0].scene == b[0].scene
    assert [p.text for p in sample_prompts("train", 12, 3)] != [p.text for p in a]
    assert [p.category for p in a[:6]] == ["simple", "medium", "complex"] * 2
    with pytest.raises(ValueError, match="split must be one of"):
        sample_prompts("test", 2, 0)


def test_caption_round_trip_and_tiers(prompts) -> None:
    for p in prompts:
        spec = parse_caption(p.text)
        assert spec == p.scene.spec
        assert caption_of(spec) == p.text
        n = spec.n_objects
        assert len(p.scene.objects) == n
        if p.category == "simple":
            assert n == 1
        elif p.category == "medium":
            assert n == 2 or (len(spec.groups) == 1 and spec.groups[0].count > 1)
        else:
            assert n >= 3 and (spec.relations or any(g.count > 1 for g in spec.groups))


def test_render_uses_palette_and_objects_never_touch(prompts) -> None:
    allowed = {tuple(c) for c in COLORS.values()} | {BACKGROUND}
    for p in prompts:
        img = render(p.scene)
        assert img.shape == (32, 32, 3) and img.dtype == np.uint8
        assert {tuple(c) for c in img.reshape(-1, 3)} <= allowed
        # 8-connected components of non-background pixels are exactly the objects.
        _, n = ndimage.label(img.any(-1), structure=np.ones((3, 3), bool))
        assert n == len(p.scene.objects), p.text


def test_train_split_never_uses_heldout_pairs() -> None:
    train = sample_prompts("train", 600, 1)
    heldout = sample_prompts("heldout", 600, 1)
    pairs = lambda ps: {(o.color, o.shape) for p in ps for o in p.scene.objects}  # noqa: E731
    assert not pairs(train) & HELDOUT_PAIRS
    assert pairs(heldout) & HELDOUT_PAIRS


@pytest.mark.parametrize(
    "bad",
    [
        "a purple circle",
        "two red circle",
        "a red circles",
        "a red circle left a blue square",
        "two red circles left of a blue square",
        "a red circle and a red circle",
        "hello",
    ],
)
def test_parse_rejects_captions_outside_the_grammar(bad: str) -> None:
    with pytest.raises(CaptionError):
        parse_caption(bad)
