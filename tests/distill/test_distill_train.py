"""The training loop on the shapes world (tiny settings): metrics, resume equals an uninterrupted
run, a run of other settings is not resumed; then the before/after evaluation and its survey."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import torch
from distill_tiny import tiny_config
from safetensors.torch import load_file

from addiffusion.config import UserError
from addiffusion.distill.evaluate import evaluate
from addiffusion.distill.train import train


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(str(out / "student" / "unet" / "diffusion_pytorch_model.safetensors"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("distill") / "run"
    train(tiny_config(), out, progress=False)
    return out


def test_metrics_and_outputs(trained: Path) -> None:
    rows = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    for r in rows:
        assert {"step", "total", "kl", "mse", "lr", "grad_norm"} <= set(r)
        assert all(isinstance(r[k], float) for k in ("total", "kl", "mse", "lr", "grad_norm"))
    assert rows[0]["kl_weight"] == 0.0 and rows[0]["total"] == pytest.approx(rows[0]["mse"])
    assert rows[-1]["kl_weight"] == 1.0
    assert len(rows[-1]["kl_per_timestep"]) == 4
    assert sum(rows[-1]["kl_per_timestep"]) / 4 == pytest.approx(rows[-1]["kl"], rel=1e-5)
    assert "image_mse" in rows[1] and "image_mse" not in rows[0]
    with (trained / "training.csv").open() as f:
        assert len(list(csv.DictReader(f))) == 4
    for d in ("student", "student_init"):
        assert (trained / d / "model_index.json").is_file()
    before = load_file(str(trained / "student_init/unet/diffusion_pytorch_model.safetensors"))
    after = _weights(trained)
    assert any(not torch.equal(before[k], after[k]) for k in before)  # it learned something


def test_resume_gives_the_uninterrupted_result(trained: Path, tmp_path: Path) -> None:
    out = tmp_path / "run"
    s1 = train(tiny_config(), out, progress=False, stop_at=2)
    assert s1.steps == 2 and not (out / "student").exists()
    s2 = train(tiny_config(), out, progress=False)
    assert s2.resumed_from == 2 and s2.steps == 4
    a, b = _weights(trained), _weights(out)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    rows = [json.loads(x) for x in (out / "metrics.jsonl").read_text().splitlines()]
    want = [json.loads(x) for x in (trained / "metrics.jsonl").read_text().splitlines()]
    assert rows == want
    with pytest.raises(UserError, match="distill.learning_rate"):
        train(tiny_config(learning_rate=0.1), out, progress=False)


def test_eval_and_survey(trained: Path, tmp_path: Path) -> None:
    cfg = tiny_config()
    r = evaluate(cfg, trained, tmp_path / "res", tmp_path / "survey", tmp_path / "key")
    assert r["n_items"] == 4 and r["n_prompts"] == 2
    for m in ("teacher", "pre", "post"):
        assert set(r["table"][m]) == {"image_mse", "clip", "verifier", "diversity"}
    assert r["table"]["teacher"]["image_mse"] == 0.0
    comp = r["post_minus_pre"]["image_mse"]
    assert comp["ci_low"] <= comp["diff"] <= comp["ci_high"]
    metrics = json.loads((tmp_path / "res" / "metrics.json").read_text())
    assert metrics["table"] == r["table"]
    assert "| student, after |" in (tmp_path / "res" / "report.md").read_text()
    assert (tmp_path / "res" / "comparison.png").stat().st_size > 0
    with (tmp_path / "survey" / "survey.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == 3
    assert (tmp_path / "key" / "answer_key.csv").is_file()
    assert not (tmp_path / "survey" / "answer_key.csv").exists()


def test_bf16_mixed_precision_trains(tmp_path: Path) -> None:
    """accelerate's bf16 autocast (CPU here, GPUs in real runs) with a bf16 teacher."""
    s = train(tiny_config(mixed_precision="bf16", train_steps=2), tmp_path / "run", progress=False)
    assert s.steps == 2
    for key in ("total", "kl", "mse", "grad_norm", "image_mse"):
        assert torch.isfinite(torch.tensor(s.last[key])), key
