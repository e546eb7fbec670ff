"""Prompt sets: the built-in tiers, the shapes world, benchmark prompt files in their published
layouts (DrawBench, PartiPrompts, COCO captions, GenEval, T2I-CompBench) and Hub datasets."""

from __future__ import annotations

import csv
import hashlib
import io
import json
from dataclasses import dataclass
from pathlib import Path

from addiffusion.config import UserError

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


def _require(ok: bool, where: str, what: str) -> None:
    if not ok:
        raise ValueError(f"{where}: {what}")


def _read_utf8(path: Path) -> str:
    try:
        return path.read_bytes().decode("utf-8")
    except UnicodeDecodeError as e:
        line = path.read_bytes()[: e.start].count(b"\n") + 1
        raise UserError(
            f"prompt file {path}:{line}: not UTF-8 text (byte {e.start}: "
            f"{e.object[e.start : e.start + 1]!r}); save the file as UTF-8"
        ) from e


def _text(value: object, where: str, column: str) -> str:
    _require(
        isinstance(value, str) and bool(value.strip()),
        where,
        f"expected a non-empty string in {column!r}, got {value!r}",
    )
    return str(value).strip()


def _read_table(path: Path, delimiter: str) -> list[tuple[str, str]]:
    """CSV / TSV with a header. PartiPrompts (TSV: Prompt, Category, Challenge, Note), DrawBench
    (CSV: Prompts, Category) or a plain file with ``prompt`` [+ ``category``]."""
    with io.StringIO(_read_utf8(path), newline="") as f:
        reader = csv.DictReader(f, delimiter=delimiter)
        names = reader.fieldnames or []
        column = next((c for c in ("Prompt", "Prompts", "prompt") if c in names), None)
        _require(
            column is not None,
            f"{path}:1",
            f"expected a header with a Prompt (PartiPrompts), Prompts (DrawBench) or prompt "
            f"column, got {names}",
        )
        cat = next((c for c in ("Category", "category") if c in names), None)
        rows = []
        for row in reader:
            where = f"{path}:{reader.line_num}"
            _require(None not in row, where, f"more fields than the header's {len(names)}")
            text = _text(row.get(column), where, str(column))
            rows.append((text, (row.get(cat) or "").strip() or path.stem if cat else path.stem))
    return rows


def _read_jsonl(path: Path) -> list[tuple[str, str]]:
    """One JSON object per line with ``prompt``; category from ``category`` or GenEval's
    ``tag`` (GenEval's ``evaluation_metadata.jsonl``)."""
    rows = []
    for n, line in enumerate(_read_utf8(path).splitlines(), 1):
        if not line.strip():
            continue
        where = f"{path}:{n}"
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{where}: not valid JSON ({e.msg})") from e
        _require(isinstance(obj, dict), where, f"expected a JSON object, got {line[:80]!r}")
        text = _text(obj.get("prompt"), where, "prompt")
        rows.append((text, str(obj.get("category") or obj.get("tag") or path.stem)))
    return rows


def _read_coco(path: Path) -> list[tuple[str, str]]:
    """COCO captions (``captions_*.json``): the first caption of every image, in file order."""
    try:
        data = json.loads(_read_utf8(path))
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from e
    _require(
        isinstance(data, dict) and isinstance(data.get("annotations"), list),
        str(path),
        "expected COCO captions JSON: an object with an 'annotations' list",
    )
    seen: set[object] = set()
    rows = []
    for i, ann in enumerate(data["annotations"]):
        where = f"{path}: annotations[{i}]"
        _require(isinstance(ann, dict) and "image_id" in ann, where, "expected an image_id")
        if ann["image_id"] in seen:
            continue
        seen.add(ann["image_id"])
        rows.append((_text(ann.get("caption"), where, "caption"), "coco"))
    return rows


def _read_txt(path: Path, category: str) -> list[tuple[str, str]]:
    return [(line.strip(), category) for line in _read_utf8(path).splitlines() if line.strip()]


def _read_compbench(folder: Path) -> list[tuple[str, str]]:
    """T2I-CompBench: one ``<category>_<split>.txt`` per category (``color_val.txt``, ...)."""
    files = sorted(folder.glob("*.txt"))
    _require(bool(files), str(folder), "expected T2I-CompBench *.txt files (one per category)")
    rows = []
    for f in files:
        category = f.stem.removesuffix("_val").removesuffix("_train").removesuffix("_test")
        rows.extend(_read_txt(f, category))
    return rows


def _read_hub(spec: str) -> list[tuple[str, str]]:
    """``hf:<dataset id>[:<split>]`` through ``datasets.load_dataset`` (Hub or local cache)."""
    import datasets

    name, _, split = spec.removeprefix("hf:").partition(":")
    ds = datasets.load_dataset(name, split=split or "train")
    column = next(
        (c for c in ("Prompt", "Prompts", "prompt", "caption", "text") if c in ds.column_names),
        None,
    )
    _require(column is not None, spec, f"no prompt column among {ds.column_names}")
    cat = next((c for c in ("Category", "category", "tag") if c in ds.column_names), None)
    return [
        (_text(row[column], f"{spec} row {i}", str(column)), str(row[cat]) if cat else name)
        for i, row in enumerate(ds)
    ]


def _read_file(path: Path) -> list[tuple[str, str]]:
    """Prompt files by layout: a folder (T2I-CompBench), .tsv (PartiPrompts), .csv (DrawBench or
    ``prompt``), .json (COCO captions), .jsonl (GenEval or ``prompt``), .txt (one per line)."""
    if not path.exists():
        raise FileNotFoundError(f"prompt file {path} not found")
    if path.is_dir():
        rows = _read_compbench(path)
    elif path.suffix == ".tsv":
        rows = _read_table(path, "\t")
    elif path.suffix == ".csv":
        rows = _read_table(path, ",")
    elif path.suffix == ".json":
        rows = _read_coco(path)
    elif path.suffix == ".jsonl":
        rows = _read_jsonl(path)
    elif path.suffix == ".txt":
        rows = _read_txt(path, "file")
    else:
        raise ValueError(
            f"prompt file {path}: expected a folder, .txt, .tsv, .csv, .json or .jsonl, "
            f"got {path.suffix!r}"
        )
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
    elif source.startswith("hf:"):
        rows = _read_hub(source)
    else:
        rows = _read_file(Path(source))
    if n_prompts:
        rows = rows[:n_prompts]
    return [
        PromptRecord(i, text, cat, "heldout" if _heldout(text, heldout_fraction, seed) else "train")
        for i, (text, cat) in enumerate(rows)
    ]
