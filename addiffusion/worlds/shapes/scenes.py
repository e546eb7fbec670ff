"""Procedural scenes of the shapes world: a structured :class:`Scene` and its 32x32 RGB render.

A scene is built from a :class:`SceneSpec` (what the caption asks for: groups of objects with a
colour, a shape, an optional size and a count, plus left/right/above/below relations between
single-object groups). Objects get positions that satisfy the relations, never touch (so the
verifier's connected components are exactly the objects), and are drawn without anti-aliasing in
pure palette colours on a black background.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import numpy as np
from scipy import ndimage

COLORS: dict[str, tuple[int, int, int]] = {
    "red": (255, 0, 0),
    "green": (0, 200, 0),
    "blue": (0, 64, 255),
    "yellow": (255, 230, 0),
}
SHAPES: tuple[str, ...] = ("circle", "square", "triangle")
SIZES: dict[str, float] = {"small": 4.0, "large": 6.0}  # radius of the shape's disc, pixels
RELATIONS: tuple[str, ...] = ("left of", "right of", "above", "below")
BACKGROUND: tuple[int, int, int] = (0, 0, 0)
# Colour x shape pairs that never occur in the train split (compositional generalisation).
HELDOUT_PAIRS: frozenset[tuple[str, str]] = frozenset({("yellow", "triangle")})
# A relation holds when centroids differ by more than this many pixels along its axis.
RELATION_MARGIN: float = 2.0
# Scenes are generated with a wider margin so that renders satisfy relations with room to spare.
_GEN_MARGIN: float = 5.0
_GAP: int = 2  # minimum free pixels between two objects (so components never merge)
_EIGHT = np.ones((3, 3), bool)


@dataclass(frozen=True)
class Group:
    """``count`` objects of one colour and shape; ``size`` None means "not said" (any size)."""

    color: str
    shape: str
    count: int = 1
    size: str | None = None


@dataclass(frozen=True)
class Relation:
    """Group ``a`` is ``rel`` group ``b`` (both single-object groups), e.g. a "left of" b."""

    a: int
    rel: str
    b: int


@dataclass(frozen=True)
class SceneSpec:
    """What a caption asks for. Groups have distinct (colour, shape) pairs."""

    groups: tuple[Group, ...]
    relations: tuple[Relation, ...] = ()

    @property
    def n_objects(self) -> int:
        return sum(g.count for g in self.groups)


@dataclass(frozen=True)
class SceneObject:
    """One drawn object; ``x``, ``y`` are the centre in pixels, ``group`` its spec group index."""

    color: str
    shape: str
    size: str
    x: float
    y: float
    group: int


@dataclass(frozen=True)
class Scene:
    spec: SceneSpec
    objects: tuple[SceneObject, ...]
    height: int = 32
    width: int = 32


def relation_holds(rel: str, a: tuple[float, float], b: tuple[float, float], margin: float) -> bool:
    """Whether centre ``a`` (x, y) is ``rel`` centre ``b`` with at least ``margin`` pixels."""
    (ax, ay), (bx, by) = a, b
    if rel == "left of":
        return ax < bx - margin
    if rel == "right of":
        return ax > bx + margin
    if rel == "above":
        return ay < by - margin
    if rel == "below":
        return ay > by + margin
    raise ValueError(f"unknown relation {rel!r}; expected one of {', '.join(RELATIONS)}")


def layout_scene(
    spec: SceneSpec, rng: np.random.Generator, height: int = 32, width: int = 32
) -> Scene:
    """Place the spec's objects (rejection sampling) so relations hold and objects never touch.

    Raises ``RuntimeError`` if no layout is found in 2000 tries (never for the built-in grammar).
    """
    items: list[tuple[int, str]] = []
    for gi, g in enumerate(spec.groups):
        for _ in range(g.count):
            size = g.size if g.size is not None else str(rng.choice(list(SIZES)))
            items.append((gi, size))
    # Group b of a relation is placed after group a: check each relation when b is placed.
    first = {}
    for idx, (gi, _s) in enumerate(items):
        first.setdefault(gi, idx)
    needs = {first[r.b]: (r.rel, first[r.a]) for r in spec.relations}
    g = _GAP
    for _ in range(2000):
        placed: list[tuple[float, float]] = []
        pos: list[tuple[float, float]] = []  # silhouette centroids, as the verifier sees them
        # Placed objects grown by the gap, on a canvas padded by the gap (grown stamps overhang).
        occupied = np.zeros((height + 2 * g, width + 2 * g), bool)
        for idx, (gi, size) in enumerate(items):
            r, shape = SIZES[size], spec.groups[gi].shape
            stamp, grown, (dy, dx) = _stamps(shape, size)
            cx, cy = shape_centroid(shape, r)
            h, w = stamp.shape
            for _try in range(50):
                # Centres on pixel corners: every object of a kind has the same pixel silhouette.
                x = int(rng.integers(int(r) + 1, width - int(r)))
                y = int(rng.integers(int(r) + 1, height - int(r)))
                if idx in needs:
                    rel, other = needs[idx]
                    if not relation_holds(rel, pos[other], (x + cx, y + cy), _GEN_MARGIN):
                        continue
                top, left = y + dy, x + dx
                if (stamp & occupied[top + g : top + g + h, left + g : left + g + w]).any():
                    continue
                occupied[top : top + h + 2 * g, left : left + w + 2 * g] |= grown
                placed.append((float(x), float(y)))
                pos.append((x + cx, y + cy))
                break
            else:
                break
        if len(placed) == len(items):
            objects = tuple(
                SceneObject(spec.groups[gi].color, spec.groups[gi].shape, size, x, y, gi)
                for (gi, size), (x, y) in zip(items, placed, strict=True)
            )
            return Scene(spec, objects, height, width)
    raise RuntimeError(f"could not lay out {spec} in {height}x{width} after 2000 tries")


@functools.cache
def _stamps(shape: str, size: str) -> tuple[np.ndarray, np.ndarray, tuple[int, int]]:
    """Pixel silhouette of a shape centred on a pixel corner, the same grown by the gap, and the
    offset (dy, dx) of the silhouette's top-left pixel from the centre."""
    mask = shape_mask(shape, 16.0, 16.0, SIZES[size], 32, 32)
    ys, xs = np.nonzero(mask)
    stamp = mask[ys.min() : ys.max() + 1, xs.min() : xs.max() + 1]
    grown = ndimage.binary_dilation(np.pad(stamp, _GAP), _EIGHT, iterations=_GAP)
    return stamp, grown, (int(ys.min()) - 16, int(xs.min()) - 16)


@functools.cache
def shape_centroid(shape: str, r: float) -> tuple[float, float]:
    """Offset (dx, dy) of a shape's pixel centroid from its centre (triangles sit low)."""
    mask = shape_mask(shape, 16.0, 16.0, r, 32, 32)
    ys, xs = np.nonzero(mask)
    return float(xs.mean() + 0.5 - 16.0), float(ys.mean() + 0.5 - 16.0)


def shape_mask(shape: str, x: float, y: float, r: float, height: int, width: int) -> np.ndarray:
    """Boolean ``(H, W)`` mask of one shape centred at pixel (x, y) with disc radius ``r``."""
    yy, xx = np.mgrid[0:height, 0:width].astype(np.float32) + 0.5
    if shape == "circle":
        return (xx - x) ** 2 + (yy - y) ** 2 <= r * r
    if shape == "square":
        s = r * 0.8  # about the circle's visual weight
        return (np.abs(xx - x) <= s) & (np.abs(yy - y) <= s)
    if shape == "triangle":
        # Upright isosceles triangle, base 2r and height 2r: half-width grows linearly downwards.
        top = y - r
        return (yy >= top) & (yy <= y + r) & (np.abs(xx - x) <= (yy - top) / 2.0)
    raise ValueError(f"unknown shape {shape!r}; expected one of {', '.join(SHAPES)}")


def render(scene: Scene) -> np.ndarray:
    """The scene's image: ``(H, W, 3)`` uint8, palette colours on a black background."""
    img = np.empty((scene.height, scene.width, 3), np.uint8)
    img[:] = BACKGROUND
    for obj in scene.objects:
        mask = shape_mask(obj.shape, obj.x, obj.y, SIZES[obj.size], scene.height, scene.width)
        img[mask] = COLORS[obj.color]
    return img


def render_batch(scenes: list[Scene]) -> np.ndarray:
    """``(B, H, W, 3)`` uint8 renders of equally sized scenes."""
    return np.stack([render(s) for s in scenes])
