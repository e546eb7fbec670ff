"""The per-block profiler: its parts cover the denoiser's top-level blocks and sum to its calls."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
import torch
from diffusers import SD3Transformer2DModel

from addiffusion.diffusion.backbone import build_tiny_pipeline
from addiffusion.diffusion.profile import BlockProfiler, plot_parts, summarize


@pytest.fixture(scope="module")
def unet(tmp_path_factory: pytest.TempPathFactory) -> torch.nn.Module:
    return build_tiny_pipeline(0, tmp_path_factory.mktemp("tiny")).unet.eval()


def _unet_call(unet: torch.nn.Module) -> None:
    cfg = unet.config
    x = torch.randn(2, cfg.in_channels, 8, 8)
    ctx = torch.randn(2, 77, cfg.cross_attention_dim)
    with torch.no_grad():
        unet(x, torch.tensor([500, 500]), encoder_hidden_states=ctx)


def test_unet_parts_cover_every_top_level_block(unet: torch.nn.Module) -> None:
    with BlockProfiler(unet) as prof:
        tic = time.perf_counter()
        for _ in range(2):
            _unet_call(unet)
        wall = time.perf_counter() - tic
        p = prof.take()
    blocks = [f"down_blocks.{i}" for i in range(len(unet.down_blocks))]
    blocks += ["mid_block"] + [f"up_blocks.{i}" for i in range(len(unet.up_blocks))]
    assert list(prof.layout.blocks) == blocks
    for b in blocks:
        assert {f"{b}/attention", f"{b}/resnet", f"{b}/rest"} <= set(prof.layout.parts)
    assert prof.layout.parts[-1] == "other"
    assert p.calls == 2
    assert p.times_s.shape == (len(prof.layout.parts),) and (p.times_s >= 0).all()
    # Every block's resnets ran and took time; the parts partition the calls' time.
    resnet = [prof.layout.parts.index(f"{b}/resnet") for b in blocks]
    assert (p.times_s[resnet] > 0).all()
    assert 0 < p.times_s.sum() <= wall
    assert p.peak_bytes.shape == (len(blocks),) and (p.peak_bytes >= 0).all()
    assert p.cuda_peak == 0  # CPU
    # take() clears; after remove() nothing is recorded any more.
    assert prof.take().calls == 0
    _unet_call(unet)
    assert prof.take().calls == 0
    assert not unet._forward_hooks and not unet._forward_pre_hooks


def test_transformer_blocks_grouped() -> None:
    torch.manual_seed(0)
    model = SD3Transformer2DModel(
        sample_size=8,
        patch_size=2,
        in_channels=4,
        out_channels=4,
        num_layers=5,
        attention_head_dim=8,
        num_attention_heads=2,
        joint_attention_dim=16,
        caption_projection_dim=16,
        pooled_projection_dim=8,
        pos_embed_max_size=16,
    ).eval()
    with BlockProfiler(model) as prof, torch.no_grad():
        model(
            hidden_states=torch.randn(2, 4, 8, 8),
            encoder_hidden_states=torch.randn(2, 6, 16),
            pooled_projections=torch.randn(2, 8),
            timestep=torch.tensor([500.0, 500.0]),
        )
        p = prof.take()
    # 5 blocks in groups of ceil(5 / 4) = 2: 0-1, 2-3, 4-4.
    assert prof.layout.blocks == (
        "transformer_blocks.0-1",
        "transformer_blocks.2-3",
        "transformer_blocks.4-4",
    )
    assert "transformer_blocks.0-1/mlp" in prof.layout.parts
    attn = [i for i, n in enumerate(prof.layout.parts) if n.endswith("/attention")]
    assert p.calls == 1 and (p.times_s[attn] > 0).all()


def test_unknown_denoiser_refused() -> None:
    with pytest.raises(ValueError, match="cannot profile Linear"):
        BlockProfiler(torch.nn.Linear(2, 2))


def test_summary_and_plot(unet: torch.nn.Module, tmp_path: Path) -> None:
    with BlockProfiler(unet) as prof:
        _unet_call(unet)
        profiles = [prof.take()]
    rows = summarize(prof.layout, profiles)
    assert [r[0] for r in rows] == list(prof.layout.parts)
    assert np.isclose(sum(r[2] for r in rows), 1.0)
    fig = plot_parts(rows, "tiny unet")
    fig.savefig(tmp_path / "blocks.png")
    assert (tmp_path / "blocks.png").stat().st_size > 1000
    with pytest.raises(ValueError, match="no denoiser call"):
        summarize(prof.layout, [])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_cuda_peaks_are_folded_back(unet: torch.nn.Module) -> None:
    model = unet.to("cuda")
    try:
        with BlockProfiler(model) as prof, torch.no_grad():
            torch.cuda.reset_peak_memory_stats()
            x = torch.randn(2, model.config.in_channels, 8, 8, device="cuda")
            ctx = torch.randn(2, 77, model.config.cross_attention_dim, device="cuda")
            model(x, torch.tensor([500, 500], device="cuda"), encoder_hidden_states=ctx)
            p = prof.take()
        assert p.cuda_peak > 0 and (p.peak_bytes > 0).any() and (p.times_s > 0).any()
    finally:
        unet.to("cpu")
