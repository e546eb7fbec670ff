"""``addiffusion bench collect --profile-blocks``: where a denoiser step's time goes, per block.

Runs the collection of one batch (roots only, like ``bench collect``) under a
:class:`~addiffusion.diffusion.profile.BlockProfiler` and reports each part's mean latency per
denoiser call (``down_blocks.<i>/attention``, ``/resnet``, ``/rest``, ..., ``other``), its share
of the call, and each block's peak memory; optionally a bar chart.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch

from addiffusion.collect.config import CollectConfig
from addiffusion.diffusion.profile import BlockLayout, BlockProfile, BlockProfiler, summarize


def profile_blocks(
    cfg: CollectConfig, batch: int, repeats: int
) -> tuple[BlockLayout, list[BlockProfile]]:
    """One profile per repeat of collecting ``batch`` root episodes (after one warm-up run)."""
    from addiffusion.collect.collector import build_sampler, plan_episodes, run_with_branches

    cfg = dataclasses.replace(cfg, branch_prob=0.0, batch_size=batch)
    specs = plan_episodes(cfg)[:batch]
    if len(specs) < batch:
        raise ValueError(f"bench needs {batch} episodes, the prompt set gives {len(specs)}")
    sampler = build_sampler(cfg)
    profiles = []
    with torch.no_grad(), BlockProfiler(sampler.denoiser) as prof:
        run_with_branches(sampler, cfg, specs)  # warm-up: allocator, kernels, lazy imports
        prof.take()
        for _ in range(repeats):
            run_with_branches(sampler, cfg, specs)
            profiles.append(prof.take())
    return prof.layout, profiles


def format_profile(layout: BlockLayout, profiles: list[BlockProfile]) -> str:
    rows = summarize(layout, profiles)
    calls = sum(p.calls for p in profiles)
    peaks = np.max([p.peak_bytes for p in profiles], axis=0)
    lines = [f"per block, mean over {calls} denoiser calls (batch x2 for guidance):"]
    lines += [f"  {name:<32} {ms:8.2f} ms  {100 * share:5.1f}%" for name, ms, share in rows]
    lines.append("per top-level block (peak memory above its start: CUDA, else sampled RSS):")
    for j, block in enumerate(layout.blocks):
        ms = sum(r[1] for r in rows if r[0].startswith(f"{block}/"))
        share = sum(r[2] for r in rows if r[0].startswith(f"{block}/"))
        lines.append(
            f"  {block:<32} {ms:8.2f} ms  {100 * share:5.1f}%  {peaks[j] / 2**20:8.1f} MiB"
        )
    return "\n".join(lines)


def print_block_profile(
    cfg: CollectConfig, batch: int, repeats: int, plot: Path | None = None
) -> None:
    """Profile, print the table and, with ``plot``, write the bar chart there."""
    from addiffusion.diffusion.profile import plot_parts

    layout, profiles = profile_blocks(cfg, batch, repeats)
    print(format_profile(layout, profiles))
    if plot is not None:
        fig = plot_parts(summarize(layout, profiles), f"{cfg.model}: ms per denoiser call")
        Path(plot).parent.mkdir(parents=True, exist_ok=True)
        fig.savefig(plot, dpi=120)
        print(f"wrote {plot}")
