"""Caption grammar of the shapes world, its parser, and seeded prompt splits.

Tiers (``category``):
- simple:  one object                   "a large red circle"
- medium:  two objects, or a count      "a red circle left of a blue square", "two green squares"
- complex: three or four objects with relations or counts
           "a red circle above a blue square and a green triangle", "two red circles and a
           yellow square", "a red circle left of a blue square and a green triangle below a
           yellow circle"

Captions are generated from a :class:`SceneSpec` and :func:`parse_caption` inverts the grammar
exactly, so the verifier can check any caption of the grammar without the scene.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from addiffusion.worlds.shapes.scenes import (
    COLORS,
    HELDOUT_PAIRS,
    RELATIONS,
    SHAPES,
    SIZES,
    Group,
    Relation,
    Scene,
    SceneSpec,
    layout_scene,
)

CATEGORIES: tuple[str, ...] = ("simple", "medium", "complex")
SPLITS: tuple[str, ...] = ("train", "heldout")
COUNT_WORDS: dict[int, str] = {1: "a", 2: "two", 3: "three"}
_COUNT_OF = {w: n for n, w in COUNT_WORDS.items()}
_PLURAL = {s: s + "s" for s in SHAPES}
_SINGULAR = {p: s for s, p in _PLURAL.items()}
# Every word the grammar can produce (the tokenizer's vocabulary is built from this).
VOCABULARY: tuple[str, ...] = tuple(
    dict.fromkeys(
        ["a", "and", "of", "left", "right", "above", "below"]
        + list(COUNT_WORDS.values())
        + list(SIZES)
        + list(COLORS)
        + list(SHAPES)
        + list(_PLURAL.values())
    )
)


class CaptionError(ValueError):
    """A caption is not a sentence of the shapes grammar."""


@dataclass(frozen=True)
class Prompt:
    """One prompt of a split; ``scene`` is a ground-truth layout matching ``text``."""

    text: str
    category: str
    split: str
    scene: Scene


def _np(g: Group) -> str:
    words = [COUNT_WORDS[g.count]]
    if g.size is not None:
        words.append(g.size)
    words += [g.color, _PLURAL[g.shape] if g.count > 1 else g.shape]
    return " ".join(words)


def caption_of(spec: SceneSpec) -> str:
    """The caption of a spec. Relations pair consecutive groups (0 with 1, 2 with 3)."""
    rel_of = {r.a: r for r in spec.relations}
    clauses, i = [], 0
    while i < len(spec.groups):
        if i in rel_of:
            r = rel_of[i]
            if r.b != i + 1:
                raise CaptionError(f"relation {r} must link group {i} to group {i + 1}")
            clauses.append(f"{_np(spec.groups[i])} {r.rel} {_np(spec.groups[i + 1])}")
            i += 2
        else:
            clauses.append(_np(spec.groups[i]))
            i += 1
    return " and ".join(clauses)


def _parse_np(words: list[str], caption: str) -> Group:
    if len(words) not in (3, 4) or words[0] not in _COUNT_OF:
        raise CaptionError(
            f"{' '.join(words)!r} in {caption!r} is not '<a|two|three> [size] <colour> <shape>'"
        )
    count = _COUNT_OF[words[0]]
    size = words[1] if len(words) == 4 else None
    color, noun = words[-2], words[-1]
    if size is not None and size not in SIZES:
        raise CaptionError(f"unknown size {size!r} in {caption!r}; expected {', '.join(SIZES)}")
    if color not in COLORS:
        raise CaptionError(f"unknown colour {color!r} in {caption!r}; expected {', '.join(COLORS)}")
    shape = noun if count == 1 else _SINGULAR.get(noun, "")
    if shape not in SHAPES or (count == 1) != (noun in SHAPES):
        raise CaptionError(f"{noun!r} in {caption!r} does not fit count {count}")
    return Group(color, shape, count, size)


def parse_caption(caption: str) -> SceneSpec:
    """Invert :func:`caption_of`: ``"two red circles and a blue square"`` -> SceneSpec."""
    groups: list[Group] = []
    relations: list[Relation] = []
    for clause in caption.strip().lower().split(" and "):
        words = clause.split()
        rel_at = [(i, w) for i, w in enumerate(words) if w in ("left", "right", "above", "below")]
        if not rel_at:
            groups.append(_parse_np(words, caption))
            continue
        i, w = rel_at[0]
        rel, j = (f"{w} of", i + 2) if w in ("left", "right") else (w, i + 1)
        if rel not in RELATIONS or (j == i + 2 and words[i + 1 : i + 2] != ["of"]):
            raise CaptionError(f"bad relation in {clause!r} of {caption!r}")
        a, b = _parse_np(words[:i], caption), _parse_np(words[j:], caption)
        if a.count != 1 or b.count != 1:
            raise CaptionError(f"relations need single objects, got {clause!r} in {caption!r}")
        relations.append(Relation(len(groups), rel, len(groups) + 1))
        groups += [a, b]
    pairs = [(g.color, g.shape) for g in groups]
    if len(set(pairs)) != len(pairs):
        raise CaptionError(f"{caption!r} names the same colour and shape twice")
    return SceneSpec(tuple(groups), tuple(relations))


def _distinct_groups(
    rng: np.random.Generator, n: int, split: str, counts: list[int]
) -> tuple[Group, ...]:
    allowed = [
        (c, s) for c in COLORS for s in SHAPES if split == "heldout" or (c, s) not in HELDOUT_PAIRS
    ]
    idx = rng.choice(len(allowed), size=n, replace=False)
    return tuple(Group(allowed[i][0], allowed[i][1], counts[k]) for k, i in enumerate(idx))


def sample_spec(rng: np.random.Generator, category: str, split: str) -> SceneSpec:
    """A random spec of one tier; the train split never uses :data:`HELDOUT_PAIRS`."""
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")

    def rels(*pairs: tuple[int, int]) -> tuple[Relation, ...]:
        return tuple(Relation(a, str(rng.choice(RELATIONS)), b) for a, b in pairs)

    if category == "simple":
        (g,) = _distinct_groups(rng, 1, split, [1])
        size = None if rng.random() < 0.5 else str(rng.choice(list(SIZES)))
        return SceneSpec((Group(g.color, g.shape, 1, size),))
    if category == "medium":
        form = int(rng.integers(3))
        if form == 0:
            return SceneSpec(_distinct_groups(rng, 2, split, [1, 1]))
        if form == 1:
            return SceneSpec(_distinct_groups(rng, 2, split, [1, 1]), rels((0, 1)))
        return SceneSpec(_distinct_groups(rng, 1, split, [int(rng.integers(2, 4))]))
    if category == "complex":
        form = int(rng.integers(3))
        if form == 0:
            return SceneSpec(_distinct_groups(rng, 3, split, [1, 1, 1]), rels((0, 1)))
        if form == 1:
            return SceneSpec(_distinct_groups(rng, 2, split, [int(rng.integers(2, 4)), 1]))
        return SceneSpec(_distinct_groups(rng, 4, split, [1, 1, 1, 1]), rels((0, 1), (2, 3)))
    raise ValueError(f"category must be one of {', '.join(CATEGORIES)}, got {category!r}")


def sample_scene(
    rng: np.random.Generator, category: str, split: str, height: int = 32, width: int = 32
) -> Scene:
    return layout_scene(sample_spec(rng, category, split), rng, height, width)


def sample_prompts(split: str, n: int, seed: int) -> list[Prompt]:
    """``n`` prompts of a split, tiers cycling simple, medium, complex; same arguments, same list.

    The two splits draw from different random streams, and train never uses a held-out colour x
    shape pair, so held-out prompts include compositions never seen in training.
    """
    if split not in SPLITS:
        raise ValueError(f"split must be one of {', '.join(SPLITS)}, got {split!r}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    rng = np.random.default_rng([seed, SPLITS.index(split), 7919])
    prompts = []
    for i in range(n):
        category = CATEGORIES[i % 3]
        scene = sample_scene(rng, category, split)
        prompts.append(Prompt(caption_of(scene.spec), category, split, scene))
    return prompts
