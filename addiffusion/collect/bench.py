"""``addiffusion bench collect``: what full recording costs over plain generation.

In one process, on the ``collect`` backbone, interleaved repeats of

* plain: the stock ``pipe(...)`` at ``n_max`` steps (stock attention processors, one final
  decode), and
* collect: the stepwise sampler run to ``n_max`` with full recording (cross-attention capture and
  mask, x̂0 decode, CLIP features and scorers at every step) and the episodes written to a store
  shard (Parquet + Zarr + WebDataset, checksummed, renamed),

for the same prompts, seeds and batch. Prints the median of each, where collection's time goes
(denoiser, decode, CLIP, scorers, writing, other) and ends with ``collect_overhead_ratio=<x.xx>``
(collect / plain median wall time).
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from pathlib import Path

import torch

from addiffusion.collect.config import CollectConfig

PHASES = ("denoiser", "decode", "clip", "scorers")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(cfg: CollectConfig, batch: int, repeats: int) -> dict[str, float]:
    """Median seconds of plain generation and of recorded collection for one batch, the
    per-phase split of collection, and ``collect_overhead_ratio``."""
    # Imported here, not at module level: `addiffusion --help` registers every benchmark.
    from diffusers.models.attention_processor import AttnProcessor2_0

    from addiffusion.collect.collector import (
        _write_trace,
        build_sampler,
        plan_episodes,
        run_with_branches,
        shard_info,
    )
    from addiffusion.datasets.store import ShardWriter
    from addiffusion.diffusion.attention import CaptureAttnProcessor

    # Roots only: branches would add steps that plain generation does not take.
    cfg = dataclasses.replace(cfg, branch_prob=0.0, batch_size=batch)
    specs = plan_episodes(cfg)[:batch]
    if len(specs) < batch:
        raise ValueError(f"bench needs {batch} episodes, the prompt set gives {len(specs)}")
    sampler = build_sampler(cfg)
    pipe, unet = sampler.pipe, sampler.denoiser
    capture = dict(unet.attn_processors)
    # diffusers' default (SDPA) processor wherever the sampler installed its capture processor.
    stock = {
        k: AttnProcessor2_0() if isinstance(v, CaptureAttnProcessor) else v
        for k, v in capture.items()
    }
    s = cfg.sampler
    prompts = [sp.prompt.text for sp in specs]
    noise = torch.cat(
        [
            torch.randn(
                (1, unet.config.in_channels, *sampler.latent_hw),
                generator=torch.Generator("cpu").manual_seed(sp.seed),
            )
            for sp in specs
        ]
    ).to(sampler.device, sampler.dtype)

    def plain() -> None:
        unet.set_attn_processor(dict(stock))  # diffusers pops from the dict
        pipe(
            prompts,
            num_inference_steps=s.n_max,
            guidance_scale=s.guidance_scale,
            height=s.height,
            width=s.width,
            latents=noise.clone(),
            output_type="np",
        )

    phases = {k: 0.0 for k in (*PHASES, "writing")}

    def recorded(tmp: Path, r: int) -> None:
        unet.set_attn_processor(dict(capture))
        before = dict(sampler.timings)
        traces = run_with_branches(sampler, cfg, specs)
        tic = time.perf_counter()
        writer = ShardWriter(tmp, r, shard_info(cfg, sampler))
        for trace in traces:
            _write_trace(writer, cfg, trace)
        writer.commit()
        phases["writing"] += time.perf_counter() - tic
        for k in PHASES:
            phases[k] += sampler.timings.get(k, 0.0) - before.get(k, 0.0)

    times: dict[str, list[float]] = {"plain": [], "collect": []}
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        plain()  # warm-up: allocator, kernels, lazy imports
        recorded(Path(tmp), 10_000)
        phases = dict.fromkeys(phases, 0.0)
        for r in range(repeats):
            for name, fn in (("plain", plain), ("collect", lambda r=r: recorded(Path(tmp), r))):
                _sync(sampler.device)
                tic = time.perf_counter()
                fn()
                _sync(sampler.device)
                times[name].append(time.perf_counter() - tic)
    out = {f"{k}_s": statistics.median(v) for k, v in times.items()}
    out.update({f"collect_{k}_s": v / repeats for k, v in phases.items()})
    out["collect_other_s"] = out["collect_s"] - sum(v / repeats for v in phases.values())
    out["collect_overhead_ratio"] = out["collect_s"] / out["plain_s"]
    return out


def _bench(args: argparse.Namespace) -> int:
    from addiffusion.config import read_params

    torch.set_num_threads(args.threads)
    cfg = CollectConfig.from_params(read_params(args.params))
    if args.device:
        cfg = dataclasses.replace(cfg, device=args.device)
    if args.x0_decode_scale is not None:
        cfg = dataclasses.replace(cfg, x0_decode_scale=args.x0_decode_scale)
    if not Path(cfg.model).exists() and Path(cfg.model).parts[:1] == ("models",):
        raise SystemExit(f"{cfg.model} not found: build it with `addiffusion backbone build-tiny`")
    res = run_bench(cfg, args.batch, args.repeats)
    print(
        f"bench collect: model={cfg.model} scheduler={cfg.scheduler} n_max={cfg.n_max} "
        f"batch={args.batch} {cfg.height}x{cfg.width} repeats={args.repeats} device={cfg.device} "
        f"x0_decode_scale={cfg.x0_decode_scale}"
    )
    print(f"  plain   pipe(...)            {res['plain_s'] * 1e3:9.1f} ms (median)")
    print(f"  collect recorded + written   {res['collect_s'] * 1e3:9.1f} ms (median)")
    for k in (*PHASES, "writing", "other"):
        v = res[f"collect_{k}_s"]
        print(f"    {k:<10} {v * 1e3:9.1f} ms  {100 * v / res['collect_s']:5.1f}%")
    print(f"collect_overhead_ratio={res['collect_overhead_ratio']:.2f}")
    return 0


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "collect",
        help="plain generation vs collection with full recording, interleaved",
        description=__doc__,
    )
    p.add_argument("--params", default="params.yaml", help="params file (default: %(default)s)")
    p.add_argument("--batch", type=int, default=4, help="episodes per run (default: %(default)s)")
    p.add_argument("--repeats", type=int, default=5, help="timed repeats (default: %(default)s)")
    p.add_argument("--device", default=None, help="cpu | cuda (default: collect.device)")
    p.add_argument(
        "--x0-decode-scale",
        type=float,
        default=None,
        help="decode the per-step x̂0 at this fraction of the size, in (0, 1] "
        "(default: collect.x0_decode_scale)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.set_defaults(func=_bench)
