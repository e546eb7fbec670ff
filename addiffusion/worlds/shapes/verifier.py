"""Exact GenEval-style verifier: does a generated image show what its caption asks for?

Per image: every pixel within ``COLOR_TOL`` (RGB distance) of a palette colour, and nearer to it
than to the background, is labelled with that colour; 8-connected components of each colour with at
least ``MIN_AREA`` pixels are objects; each object's shape comes from its silhouette (fill ratio of
its bounding box and how its width grows from top to bottom), its size from its bounding box. The
caption is parsed back into its spec, then

- each group ("two red circles") must match exactly ``count`` objects of that colour and shape
  (and size, when the caption says one): a missing or an extra one fails the group;
- each relation ("a red circle left of a blue square") must hold between the two objects' centroids
  by more than ``RELATION_MARGIN`` pixels.

``score`` is the fraction of these checks passed (partial credit), ``correct`` is all of them.
Noise and blank images pass nothing: stray pixels never form a component of the minimum area with
a recognised silhouette.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
from scipy import ndimage

from addiffusion.worlds.shapes.captions import parse_caption
from addiffusion.worlds.shapes.scenes import BACKGROUND, COLORS, RELATION_MARGIN, relation_holds

COLOR_TOL = 100.0  # max RGB distance to a palette colour (palette colours are >= 230 apart)
MIN_AREA = 12  # pixels; the smallest rendered object (small triangle) has 32
LARGE_MIN_SIDE = (
    9  # bbox side (px) from which an object is "large" (renders: small <= 8, large >= 10)
)
_EIGHT = np.ones((3, 3), bool)


@dataclass(frozen=True)
class DetectedObject:
    color: str
    shape: str  # circle | square | triangle | unknown
    size: str  # small | large
    x: float  # centroid, pixels
    y: float
    area: int


@dataclass(frozen=True)
class VerifierResult:
    """Per-image results, all ``(B,)``: ``score`` float32 in [0, 1], ``correct`` bool,
    ``groups`` / ``relations`` float32 fraction of groups / relations satisfied (1 when the caption
    has none), ``n_objects`` int32 objects detected."""

    score: np.ndarray
    correct: np.ndarray
    groups: np.ndarray
    relations: np.ndarray
    n_objects: np.ndarray


def classify_shape(mask: np.ndarray) -> str:
    """Shape of one component from its ``(h, w)`` bounding-box crop (bool)."""
    h, w = mask.shape
    if h < 3 or w < 3 or not 0.6 <= w / h <= 1.6:
        return "unknown"
    fill = mask.sum() / float(h * w)
    widths = mask.sum(axis=1).astype(np.float32)
    third = max(h // 3, 1)
    top, bottom = widths[:third].mean(), widths[-third:].mean()
    # A triangle is markedly narrower at the top than at the bottom (circles and squares are
    # symmetric); its fill ratio is ~0.5 when crisp and rises as a decoder rounds its corners.
    if 0.3 <= fill <= 0.85 and top <= 0.6 * bottom:
        return "triangle"
    if fill >= 0.88 and top >= 0.8 * bottom:
        return "square"
    if 0.68 <= fill < 0.88 and 0.6 * bottom <= top <= bottom / 0.6:
        return "circle"
    return "unknown"


def detect_objects(image: np.ndarray) -> list[DetectedObject]:
    """Objects in one ``(H, W, 3)`` uint8 image (see module docstring)."""
    img = image.astype(np.float32)
    names = list(COLORS)
    palette = np.array([COLORS[n] for n in names] + [BACKGROUND], np.float32)  # (K+1, 3)
    dist = np.linalg.norm(img[:, :, None, :] - palette[None, None], axis=-1)  # (H, W, K+1)
    nearest = dist.argmin(-1)
    labelled = (dist.min(-1) <= COLOR_TOL) & (nearest < len(names))
    objects = []
    for k, name in enumerate(names):
        comps, n = ndimage.label(labelled & (nearest == k), structure=_EIGHT)
        for sl, idx in zip(ndimage.find_objects(comps), range(1, n + 1), strict=True):
            crop = comps[sl] == idx
            area = int(crop.sum())
            if area < MIN_AREA:
                continue
            ys, xs = np.nonzero(crop)
            side = max(crop.shape)
            objects.append(
                DetectedObject(
                    color=name,
                    shape=classify_shape(crop),
                    size="large" if side >= LARGE_MIN_SIDE else "small",
                    x=float(xs.mean() + sl[1].start + 0.5),
                    y=float(ys.mean() + sl[0].start + 0.5),
                    area=area,
                )
            )
    return objects


def verify_one(image: np.ndarray, caption: str) -> tuple[float, bool, float, float, int]:
    """``(score, correct, groups, relations, n_objects)`` of one image against one caption."""
    spec = parse_caption(caption)
    objects = detect_objects(image)
    matched: list[list[DetectedObject]] = []
    group_ok = []
    for g in spec.groups:
        same = [o for o in objects if o.color == g.color and o.shape == g.shape]
        matched.append(same)
        sizes_ok = g.size is None or all(o.size == g.size for o in same)
        group_ok.append(len(same) == g.count and sizes_ok)
    rel_ok = []
    for r in spec.relations:
        a, b = matched[r.a], matched[r.b]
        rel_ok.append(
            len(a) == 1
            and len(b) == 1
            and relation_holds(r.rel, (a[0].x, a[0].y), (b[0].x, b[0].y), RELATION_MARGIN)
        )
    checks = group_ok + rel_ok
    return (
        sum(checks) / len(checks),
        all(checks),
        float(np.mean(group_ok)),
        float(np.mean(rel_ok)) if rel_ok else 1.0,
        len(objects),
    )


def verify(images: np.ndarray, captions: list[str]) -> VerifierResult:
    """Check ``images: (B, H, W, 3)`` uint8 against ``captions`` (B strings of the grammar).

    Raises ``ValueError`` on a shape/dtype mismatch and ``CaptionError`` on a caption outside the
    grammar (naming it).
    """
    if images.ndim != 4 or images.shape[-1] != 3 or images.dtype != np.uint8:
        raise ValueError(f"images must be (B, H, W, 3) uint8, got {images.shape} {images.dtype}")
    if len(captions) != images.shape[0]:
        raise ValueError(f"got {images.shape[0]} images but {len(captions)} captions")
    rows = [verify_one(img, cap) for img, cap in zip(images, captions, strict=True)]
    cols = list(zip(*rows, strict=True)) if rows else [(), (), (), (), ()]
    return VerifierResult(
        score=np.asarray(cols[0], np.float32),
        correct=np.asarray(cols[1], bool),
        groups=np.asarray(cols[2], np.float32),
        relations=np.asarray(cols[3], np.float32),
        n_objects=np.asarray(cols[4], np.int32),
    )
