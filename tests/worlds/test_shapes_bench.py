"""``addiffusion bench shapes`` on the shipped weights: table, summary line, VAE ceiling."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import torch

from addiffusion.cli import main

ASSETS = Path(__file__).resolve().parents[2] / "assets" / "shapes"


@pytest.mark.skipif(
    not (ASSETS / "pipeline" / "model_index.json").exists(), reason="no shipped shapes weights"
)
def test_bench_prints_the_summary_line_and_writes_json(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    torch.set_num_threads(1)
    out = tmp_path / "bench.json"
    main(
        ["bench", "shapes", "--model-dir", str(ASSETS), "--n-prompts", "6", "--steps", "4", "2"]
        + ["--device", "cpu", "--json", str(out), "--grid", str(tmp_path / "grid.png")]
    )
    text = capsys.readouterr().out
    last = text.strip().splitlines()[-1]
    assert re.fullmatch(
        r"shapes: simple@4=[\d.]+ medium@4=[\d.]+ complex@4=[\d.]+ all@4=[\d.]+ all@4=[\d.]+ "
        r"clip_top1=[\d.]+",
        last,
    ), last
    assert "VAE ceiling" in text and "relations satisfied at 4 steps" in text
    res = json.loads(out.read_text())
    assert set(res["accuracy"]["all"]) == {"2", "4"}
    # Two simple prompts: the VAE alone keeps single objects recognisable.
    assert res["vae_ceiling"]["simple"] == 1.0
    assert res["relations"]["simple"] == 1.0  # simple captions have no relations
    assert all(0.0 <= v <= 1.0 for v in res["vae_ceiling"].values())
    assert (tmp_path / "grid.png").stat().st_size > 0
