"""Prompt sets: the built-in tiers, the shapes world, and prompt files (.txt, .jsonl, .csv)."""

from __future__ import annotations

import csv
import hashlib
import json
from dataclasses import dataclass
from pathlib import Path

BUILTIN: dict[str, list[str]] = {
    "simple": [
        "a red circle",
        "a blue square",
        "a green triangle",
        "a yellow circle",
        "a red square",
        "a blue triangle",
        "a green circle",
        "a yellow square",
        "a purple circle",
        "an orange square",
    ],
    "medium": [
        "two red circles",
        "a blue square and a green circle",
        "three yellow triangles",
        "a red triangle and a blue circle",
        "two green squares",
        "a purple square and a red circle",
        "a yellow circle and a blue triangle",
        "three blue circles",
        "two orange triangles",
        "a green square and a yellow triangle",
    ],
    "complex": [
        "a red circle left of a blue square above a green triangle",
        "two yellow squares right of three red circles",
        "a blue triangle below a green circle left of a purple square",
        "three green circles above two blue triangles",
        "a red square right of a yellow circle and a blue triangle below it",
        "two purple circles left of a green square above an orange triangle",
        "a yellow triangle above two red squares right of a blue circle",
        "three red triangles below a green square left of a yellow circle",
        "an orange circle right of two blue squares above a red triangle",
        "a green triangle left of a purple circle below two yellow squares",
    ],
}


@dataclass(frozen=True)
class PromptRecord:
    prompt_id: int
    text: str
    category: str
    split: str  # "train" or "heldout"


def _heldout(text: str, fraction: float, seed: int) -> bool:
    # A hash of the text (not the position) so that adding prompts never moves old ones.
    h = hashlib.sha256(f"{seed}:{text}".encode()).digest()
    return int.from_bytes(h[:8], "little") / 2**64 < fraction


def _read_file(path: Path) -> list[tuple[str, str]]:
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} not found")
    rows: list[tuple[str, str]] = []
    if path.suffix == ".txt":
        for line in path.read_text().splitlines():
            if line.strip():
                rows.append((line.strip(), "file"))
    elif path.suffix == ".jsonl":
        for n, line in enumerate(path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{n}: not valid JSON ({e.msg})") from e
            if not isinstance(obj, dict) or not isinstance(obj.get("prompt"), str):
                raise ValueError(
                    f"{path}:{n}: expected an object with a string 'prompt', got {line[:80]!r}"
                )
            rows.append((obj["prompt"], str(obj.get("category", "file"))))
    elif path.suffix == ".csv":
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if reader.fieldnames is None or "prompt" not in reader.fieldnames:
                raise ValueError(
                    f"{path}: expected a header with a 'prompt' column, got {reader.fieldnames}"
                )
            for row in reader:
                rows.append((row["prompt"], row.get("category") or "file"))
    else:
        raise ValueError(f"prompt file {path}: expected .txt, .jsonl or .csv, got {path.suffix!r}")
    if not rows:
        raise ValueError(f"prompt file {path} holds no prompts")
    return rows


def load_prompts(
    source: str, n_prompts: int, heldout_fraction: float, seed: int
) -> list[PromptRecord]:
    """Prompts with stable ids (position in the source) and a seeded, text-hashed split."""
    if source == "builtin":
        rows = [(text, cat) for cat, texts in BUILTIN.items() for text in texts]
        # Interleave tiers so that any prefix (n_prompts) covers all of them.
        rows = sorted(rows, key=lambda r: (BUILTIN[r[1]].index(r[0]), list(BUILTIN).index(r[1])))
    elif source == "shapes":
        from addiffusion.worlds.shapes.captions import sample_prompts

        n = n_prompts or 256
        n_held = int(round(n * heldout_fraction))
        out = [(p.text, p.category, "train") for p in sample_prompts("train", n - n_held, seed)]
        out += [(p.text, p.category, "heldout") for p in sample_prompts("heldout", n_held, seed)]
        return [PromptRecord(i, t, c, s) for i, (t, c, s) in enumerate(out)]
    else:
        rows = _read_file(Path(source))
    if n_prompts:
        rows = rows[:n_prompts]
    return [
        PromptRecord(i, text, cat, "heldout" if _heldout(text, heldout_fraction, seed) else "train")
        for i, (text, cat) in enumerate(rows)
    ]
