from __future__ import annotations

from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from addiffusion.collect.prompts import load_prompts

FIX = Path(__file__).parent / "fixtures"


def _load(source: Path | str) -> list[tuple[str, str]]:
    return [(p.text, p.category) for p in load_prompts(str(source), 0, 0.0, seed=0)]


def test_benchmark_layouts() -> None:
    assert _load(FIX / "PartiPrompts.tsv") == [
        ("A red bus parked next to a tree", "Vehicles"),
        ("The Eiffel Tower at night", "World Knowledge"),
    ]
    assert _load(FIX / "drawbench.csv")[2] == (
        "Three cats and one dog sitting on the grass.",
        "Counting",
    )
    # COCO: the first caption per image.
    assert _load(FIX / "captions_val2014.json") == [
        ("A man with a red helmet on a small moped on a dirt road.", "coco"),
        ("A woman wearing a net on her head cutting a cake.", "coco"),
    ]
    assert [c for _, c in _load(FIX / "evaluation_metadata.jsonl")] == [
        "single_object",
        "two_object",
        "counting",
    ]
    assert _load(FIX / "t2i_compbench") == [
        ("a green bench and a blue bowl", "color"),
        ("a red book and a yellow vase", "color"),
        ("a cat on the left of a dog", "spatial"),
    ]


def test_prompt_ids_split_and_prefix() -> None:
    recs = load_prompts(str(FIX / "drawbench.csv"), 2, 0.5, seed=0)
    assert [r.prompt_id for r in recs] == [0, 1]
    assert {r.split for r in recs} <= {"train", "heldout"}
    again = load_prompts(str(FIX / "drawbench.csv"), 0, 0.5, seed=0)
    assert [r.split for r in again[:2]] == [r.split for r in recs]  # split hashes the text


@pytest.mark.parametrize(
    ("name", "message"),
    [
        ("bad_drawbench.csv", r"bad_drawbench.csv:3: expected a non-empty string in 'Prompts'"),
        ("bad_geneval.jsonl", r"bad_geneval.jsonl:2: not valid JSON"),
        ("bad_parti.tsv", r"bad_parti.tsv:1: expected a header with a Prompt"),
        ("missing.txt", r"missing.txt not found"),
    ],
)
def test_bad_files_name_file_and_line(name: str, message: str) -> None:
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        _load(FIX / name)


def test_hub_dataset_through_datasets_load_dataset(tmp_path: Path) -> None:
    # A local folder stands in for a Hub id (no hub here); same load_dataset code path.
    folder = tmp_path / "drawbench"
    folder.mkdir()
    table = pa.table(
        {"Prompts": ["A red colored car.", "A pizza."], "Category": ["Colors", "Misc"]}
    )
    pq.write_table(table, folder / "train.parquet")
    assert _load(f"hf:{folder}") == [("A red colored car.", "Colors"), ("A pizza.", "Misc")]
