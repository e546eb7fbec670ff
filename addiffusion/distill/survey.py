"""Blinded side-by-side survey export: the distilled vs the non-distilled student.

``survey_dir/survey.csv`` has one row per question with the columns of :data:`COLUMNS`
(importable into survey tools such as Qualtrics: a loop-and-merge or a CSV of image pairs), and
``survey_dir/images/`` the PNGs, named by random tokens so that a file name gives nothing away.
Which side is the distilled student is drawn at random per question; ``randomized_label`` is the
question's opaque random code that links it to the answer key. The key
(``key_dir/answer_key.csv``: question_id, randomized_label, image_a_model, image_b_model, seed of
the pair's image) is written to a separate folder, to be kept from the raters.
"""

from __future__ import annotations

import csv
import shutil
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image

COLUMNS = (
    "question_id",
    "prompt_id",
    "prompt_text",
    "image_a_path",
    "image_b_path",
    "randomized_label",
)
KEY_COLUMNS = ("question_id", "randomized_label", "image_a_model", "image_b_model", "item")
MODEL_NAMES = {"pre": "student_not_distilled", "post": "student_distilled"}


def _token(rng: np.random.Generator, n: int = 12) -> str:
    alphabet = np.array(list("abcdefghijkmnpqrstuvwxyz23456789"))
    return "".join(rng.choice(alphabet, size=n))


def export_survey(
    images_pre: np.ndarray,
    images_post: np.ndarray,
    prompts: Sequence[tuple[int, str]],
    n_pairs: int,
    survey_dir: Path,
    key_dir: Path,
    seed: int,
    image_size: int = 256,
) -> list[dict[str, str]]:
    """Write ``n_pairs`` blinded questions (items drawn without replacement, one per prompt
    first) and the answer key. ``images_*``: (N, H, W, 3) uint8, item n of both the same prompt
    and noise; ``prompts``: (N,) (prompt_id, text). Returns the CSV rows.

    The draw is seeded by ``seed`` (a reproducible survey); the survey folder and the key folder
    must differ (the key must not ship with the survey)."""
    if images_pre.shape != images_post.shape or len(prompts) != len(images_pre):
        raise ValueError(
            f"need paired images and prompts: {images_pre.shape}, {images_post.shape}, "
            f"{len(prompts)} prompts"
        )
    survey_dir, key_dir = Path(survey_dir), Path(key_dir)
    if survey_dir.resolve() == key_dir.resolve() or key_dir.resolve().is_relative_to(
        survey_dir.resolve()
    ):
        raise ValueError(f"the answer key folder {key_dir} must be outside the survey {survey_dir}")
    rng = np.random.default_rng([seed, 0x5A7E])
    # One item per prompt first (in random order), then the remaining items, so a short survey
    # covers as many prompts as it can.
    order = rng.permutation(len(prompts))
    seen: set[int] = set()
    first, rest = [], []
    for n in order:
        (first if prompts[n][0] not in seen else rest).append(int(n))
        seen.add(prompts[n][0])
    chosen = (first + rest)[: min(n_pairs, len(prompts))]
    for d in (survey_dir, key_dir):
        if d.exists():
            shutil.rmtree(d)
    (survey_dir / "images").mkdir(parents=True)
    key_dir.mkdir(parents=True)
    rows, key_rows = [], []
    labels: set[str] = set()
    for q, n in enumerate(chosen, start=1):
        post_first = bool(rng.integers(0, 2))
        sides = ("post", "pre") if post_first else ("pre", "post")
        paths = []
        for side in sides:
            img = images_post[n] if side == "post" else images_pre[n]
            name = f"images/{_token(rng)}.png"
            Image.fromarray(img).resize((image_size, image_size), Image.NEAREST).save(
                survey_dir / name
            )
            paths.append(name)
        label = _token(rng, 8)
        while label in labels:  # a collision in 32**8 codes: draw again
            label = _token(rng, 8)
        labels.add(label)
        pid, text = prompts[n]
        rows.append(
            {
                "question_id": f"Q{q:04d}",
                "prompt_id": str(pid),
                "prompt_text": text,
                "image_a_path": paths[0],
                "image_b_path": paths[1],
                "randomized_label": label,
            }
        )
        key_rows.append(
            {
                "question_id": f"Q{q:04d}",
                "randomized_label": label,
                "image_a_model": MODEL_NAMES[sides[0]],
                "image_b_model": MODEL_NAMES[sides[1]],
                "item": str(n),
            }
        )
    for path, cols, data in (
        (survey_dir / "survey.csv", COLUMNS, rows),
        (key_dir / "answer_key.csv", KEY_COLUMNS, key_rows),
    ):
        with path.open("w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(data)
    return rows
