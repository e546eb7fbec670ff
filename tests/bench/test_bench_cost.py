"""``addiffusion bench cost``: FLOPs on the meta device, timing on channel-scaled configs, the
NFE -> wall-time conversion, and the command line."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from addiffusion.bench import cost
from addiffusion.cli import main

torch.set_num_threads(1)


@pytest.mark.parametrize(
    ("family", "denoiser_m", "vae_m"),
    # Parameter counts of the public checkpoints: the embedded configs build the same modules.
    [("sd15", 859.5, 83.7), ("sdxl", 2567.5, 83.7), ("sd3", 2028.3, 83.8)],
)
def test_configs_mirror_the_public_models(family: str, denoiser_m: float, vae_m: float) -> None:
    f = cost.FAMILIES[family]
    with torch.device("meta"):
        n = {p: sum(t.numel() for t in cost._build(f, p, False).parameters()) for p in cost.PARTS}
    assert n["denoiser"] / 1e6 == pytest.approx(denoiser_m, abs=0.5)
    assert n["vae"] / 1e6 == pytest.approx(vae_m, abs=0.5)
    assert n["taesd"] / 1e6 == pytest.approx(2.4, abs=0.1)  # TAESD: ~2.4M parameters
    assert n["clip"] / 1e6 == pytest.approx(304.0, abs=0.5)  # ViT-L/14 image tower


def test_sd15_flops_at_real_size_on_meta() -> None:
    row = cost.measure("sd15", 512, timed=False)
    # One SD 1.5 UNet call at 64x64 latents, batch 2: ~1.6 TFLOPs (2 FLOPs per multiply-add).
    assert 1400 < row["denoiser_gflops"] < 1800
    assert row["vae_gflops"] > row["denoiser_gflops"]  # the VAE decoder is the heavy one
    assert 0 < row["taesd_gflops"] < row["vae_gflops"] / 10
    assert 0 < row["clip_gflops"] < row["denoiser_gflops"]
    assert 0 < row["obs_preview_flop_ratio"] < row["obs_vae_flop_ratio"]
    assert row["time_skipped"] == "--no-time" and "denoiser_ms" not in row


def test_tiny_row_timed() -> None:
    row = cost.measure("sdxl", 128, repeats=1, tiny=True)
    assert all(row[f"{p}_gflops"] > 0 for p in cost.PARTS)
    assert row["time_skipped"] is None
    assert all(row[f"{p}_ms"] > 0 for p in cost.PARTS)
    assert row["obs_preview_flop_ratio"] < row["obs_vae_flop_ratio"]
    assert row["obs_vae_time_ratio"] == pytest.approx(
        (row["vae_ms"] + row["clip_ms"]) / row["denoiser_ms"]
    )


def test_timing_skipped_when_memory_does_not_fit(monkeypatch: pytest.MonkeyPatch) -> None:
    import psutil

    class Little:
        available = 2**20

    monkeypatch.setattr(psutil, "virtual_memory", lambda: Little())
    row = cost.measure("sd15", 128, tiny=True)
    assert "GiB available" in row["time_skipped"] and row["denoiser_gflops"] > 0
    assert "timing skipped: needs" in cost.format_table([row], (0.4,))


def test_wall_saving() -> None:
    assert cost.wall_saving(0.4, 0.0) == pytest.approx(0.4)
    c = 0.25
    assert cost.wall_saving(c / (1 + c), c) == pytest.approx(0.0)  # break-even
    assert cost.wall_saving(0.1, c) < 0  # saves NFE, loses wall time


def test_cli_writes_table_and_json(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "cost.json"
    argv = ["bench", "cost", "--tiny", "--no-time", "--families", "sd15,sd3"]
    assert main([*argv, "--resolutions", "128,64", "--json", str(out)]) == 0
    text = capsys.readouterr().out
    assert "sd15@128" in text and "sd3@64" in text and "break-even" in text
    assert "runwayml/stable-diffusion-v1-5" in text and "madebyollin/taesd3" in text
    rows = json.loads(out.read_text())["rows"]
    assert [r["family"] for r in rows] == ["sd15", "sd3"]
    assert all(r["obs_preview_flop_ratio"] < r["obs_vae_flop_ratio"] for r in rows)


@pytest.mark.parametrize(
    ("args", "flag"),
    [
        (["--families", "sd2"], "--families"),
        (["--families", "sd15", "--resolutions", "500"], "--resolutions"),
        (["--nfe-savings", "1.5"], "--nfe-savings"),
        (["--repeats", "0"], "--repeats"),
    ],
)
def test_bad_flags_are_named(args: list[str], flag: str) -> None:
    with pytest.raises(SystemExit, match=flag):
        main(["bench", "cost", "--tiny", "--no-time", *args])
