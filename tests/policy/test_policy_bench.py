"""``addiffusion bench policy`` end to end on the shipped shapes world with a random-weight policy
(the numbers are not checked against each other: which method is faster is what it measures)."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import pytest
import torch

from addiffusion.cli import main

SHAPES = Path(__file__).resolve().parents[2] / "assets" / "shapes"


@pytest.fixture
def random_package(tmp_path: Path) -> Path:
    """A random-weight policy package for the shipped shapes pipeline (16-point DDIM grid)."""
    from addiffusion.diffusion.actions import ActionTable
    from addiffusion.diffusion.mdp import ObservationLayout
    from addiffusion.diffusion.sampler import SamplerSettings
    from addiffusion.online_finetune.actor import ActorSpec, MlpActor
    from addiffusion.policy.package import PolicyConfig, build_policy
    from addiffusion.rewards.clip import ClipScorer

    torch.manual_seed(0)
    dim = ClipScorer(str(SHAPES / "clip")).dim
    s = SamplerSettings(n_max=16, strides=(1, 2, 4, 8), refine_budget=1, guidance_scale=4.0)
    table = ActionTable.build(s.strides, s.n_max, s.warmup, s.refine_budget, s.refine_k)
    layout = ObservationLayout(dim, dim)
    spec = ActorSpec(layout.dim, (32,), table.n)
    cfg = PolicyConfig(
        algo="iql",
        networks=(spec,),
        actions=table,
        observation=layout,
        scorer=str(SHAPES / "clip"),
        backbone=str(SHAPES / "pipeline"),
        family="sd",
        solver="ddim",
        sampler=dataclasses.asdict(s),
    )
    out = tmp_path / "policy"
    build_policy(cfg, [MlpActor(spec)]).save_pretrained(out)
    return out


def test_bench_policy_cli(
    random_package: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    metrics = tmp_path / "bench.json"
    args = ["bench", "policy", "--policy", str(random_package), "--device", "cpu"]
    args += ["--n-prompts", "2", "--batch-size", "2", "--repeats", "1", "--json", str(metrics)]
    assert main(args) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert re.fullmatch(r"policy_speedup=\d+\.\d{3} policy_overhead=\d+\.\d{3}", last), last

    data = json.loads(metrics.read_text())
    for key in (
        "stock_s_per_image",
        "adaptive_s_per_image",
        "stock_nfe",
        "adaptive_nfe",
        "stock_denoiser_calls",
        "adaptive_denoiser_calls",
        "stock_denoiser_share",
        "adaptive_denoiser_share",
        "stock_overhead",
        "policy_speedup",
        "policy_overhead",
    ):
        assert data[key] > 0, key
    assert data["n_images"] == 2 and len(data["stock_rounds_s"]) == 1
    # The stock pipeline runs the whole batch (both CFG branches) in one call per step.
    assert data["stock_denoiser_calls"] == data["stock_nfe"] == 50
    assert 0 < data["adaptive_denoiser_share"] < 1
    assert f"policy_speedup={data['policy_speedup']:.3f}" in last
