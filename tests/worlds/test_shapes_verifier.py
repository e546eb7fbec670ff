"""The verifier's accuracy claims: right on renders, no credit for noise, blanks or wrong captions."""

from __future__ import annotations

import numpy as np
import pytest

from addiffusion.worlds.shapes.captions import sample_prompts
from addiffusion.worlds.shapes.scenes import render
from addiffusion.worlds.shapes.verifier import classify_shape, detect_objects, verify


@pytest.fixture(scope="module")
def renders():
    ps = sample_prompts("heldout", 240, 11) + sample_prompts("train", 120, 12)
    return np.stack([render(p.scene) for p in ps]), [p.text for p in ps], ps


def test_ground_truth_renders_are_correct(renders) -> None:
    images, captions, _ = renders
    res = verify(images, captions)
    assert res.score.shape == (len(captions),) and res.score.dtype == np.float32
    assert res.correct.dtype == bool
    assert res.correct.mean() >= 0.99
    assert np.all((res.score >= 0) & (res.score <= 1))


def test_detects_every_object_with_its_attributes(renders) -> None:
    images, _, prompts = renders
    for img, p in zip(images[:60], prompts[:60], strict=True):
        got = sorted((o.color, o.shape, o.size) for o in detect_objects(img))
        want = sorted((o.color, o.shape, o.size) for o in p.scene.objects)
        assert got == want, p.text


def test_noise_and_blank_get_no_credit(renders) -> None:
    images, captions, _ = renders
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, images.shape, dtype=np.uint8)
    for fake in (noise, np.zeros_like(images), np.full_like(images, 255)):
        res = verify(fake, captions)
        assert res.correct.mean() <= 0.05
        assert res.score.mean() <= 0.05


def test_shuffled_captions_near_chance(renders) -> None:
    images, captions, _ = renders
    perm = np.random.default_rng(1).permutation(len(captions))
    res = verify(images, [captions[i] for i in perm])
    assert res.correct.mean() <= 0.15


def test_wrong_attribute_fails() -> None:
    (p,) = sample_prompts("heldout", 1, 5)  # a simple prompt
    img = render(p.scene)
    obj = p.scene.objects[0]
    other_color = "blue" if obj.color != "blue" else "red"
    other_shape = "square" if obj.shape != "square" else "circle"
    other_size = "small" if obj.size == "large" else "large"
    caps = [
        f"a {obj.color} {obj.shape}",
        f"a {other_color} {obj.shape}",
        f"a {obj.color} {other_shape}",
        f"a {other_size} {obj.color} {obj.shape}",
        f"two {obj.color} {obj.shape}s",
    ]
    res = verify(np.stack([img] * len(caps)), caps)
    assert res.correct.tolist() == [True, False, False, False, False]


def test_silhouettes() -> None:
    square = np.ones((8, 8), bool)
    yy, xx = np.mgrid[0:10, 0:10] + 0.5
    circle = (xx - 5) ** 2 + (yy - 5) ** 2 <= 25
    tri = np.abs(xx - 5) <= yy / 2
    assert classify_shape(square) == "square"
    assert classify_shape(circle) == "circle"
    assert classify_shape(tri) == "triangle"
    assert classify_shape(np.ones((2, 9), bool)) == "unknown"


def test_bad_inputs_are_named() -> None:
    with pytest.raises(ValueError, match=r"\(B, H, W, 3\) uint8"):
        verify(np.zeros((1, 32, 32, 3), np.float32), ["a red circle"])
    with pytest.raises(ValueError, match="2 images but 1 captions"):
        verify(np.zeros((2, 32, 32, 3), np.uint8), ["a red circle"])
