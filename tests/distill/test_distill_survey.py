"""The blinded survey export: columns, blinding (names, sides, key kept apart), reproducibility."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from addiffusion.distill.survey import COLUMNS, export_survey


def _images(n: int, value: int) -> np.ndarray:
    img = np.zeros((n, 8, 8, 3), np.uint8)
    img[..., 0] = value  # pre: red 10, post: red 200 (tells the sides apart in the test only)
    img[..., 1] = np.arange(n)[:, None, None]
    return img


def _read(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def test_survey_is_blinded_and_keyed_apart(tmp_path: Path) -> None:
    n = 40
    prompts = [(k // 2, f"prompt {k // 2}") for k in range(n)]
    survey, key = tmp_path / "survey", tmp_path / "key"
    rows = export_survey(_images(n, 10), _images(n, 200), prompts, 24, survey, key, 0, 16)
    table = _read(survey / "survey.csv")
    assert list(table[0]) == list(COLUMNS) and table == rows and len(table) == 24
    answers = {r["question_id"]: r for r in _read(key / "answer_key.csv")}
    assert len({r["prompt_id"] for r in table}) == 20  # one item per prompt before repeats
    post_on_a = 0
    for r in table:
        for col in ("image_a_path", "image_b_path"):
            name = Path(r[col]).name
            assert "pre" not in name and "post" not in name and "distill" not in name
            assert Image.open(survey / r[col]).size == (16, 16)
        a = np.asarray(Image.open(survey / r["image_a_path"]))
        b = np.asarray(Image.open(survey / r["image_b_path"]))
        key_row = answers[r["question_id"]]
        assert key_row["randomized_label"] == r["randomized_label"]
        a_is_post = key_row["image_a_model"] == "student_distilled"
        assert key_row["image_b_model"] == (
            "student_not_distilled" if a_is_post else "student_distilled"
        )
        assert (a[0, 0, 0] == 200) == a_is_post and (b[0, 0, 0] == 200) != a_is_post
        assert a[0, 0, 1] == b[0, 0, 1]  # the same item (prompt, noise) on both sides
        post_on_a += a_is_post
    assert 0 < post_on_a < 24  # sides are randomised
    assert len({r["randomized_label"] for r in table}) == 24
    assert not list(survey.rglob("answer_key*"))
    # Same seed, same survey; another seed, another draw.
    again = export_survey(_images(n, 10), _images(n, 200), prompts, 24, survey, key, 0, 16)
    assert again == rows
    other = export_survey(_images(n, 10), _images(n, 200), prompts, 24, survey, key, 1, 16)
    assert other != rows


def test_key_inside_the_survey_is_refused(tmp_path: Path) -> None:
    imgs = _images(2, 1)
    with pytest.raises(ValueError, match="outside the survey"):
        export_survey(imgs, imgs, [(0, "a"), (1, "b")], 2, tmp_path / "s", tmp_path / "s" / "k", 0)
