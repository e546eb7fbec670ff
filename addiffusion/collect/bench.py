"""``addiffusion bench collect``: what full recording costs over plain generation.

In one process, on the ``collect`` backbone, interleaved repeats of

* plain: the stock ``pipe(...)`` at ``n_max`` steps (stock attention processors, one final
  decode),
* unobserved: the stepwise sampler on the same roots with no per-step observation and nothing
  written (what the denoising loop alone costs), and
* collect, once per decoder of the per-step observations (``--observe-with both``: the preview
  decoder ``collect.preview``, then the full VAE): the stepwise sampler run to ``n_max`` with full
  recording (cross-attention capture and mask, x̂0 decode, CLIP features and scorers at every
  step) and the episodes written to a store shard (Parquet + Zarr + WebDataset, checksummed,
  renamed),

for the same prompts, seeds and batch. Prints the median of each, where collection's time goes
(denoiser, decode, CLIP, scorers, writing, other), each collect's ``observe_overhead_ratio``
(collect / unobserved) and ends with
``collect_overhead_ratio=<x.xx> (observe_with=preview) collect_overhead_ratio_vae=<y.yy>``
(collect / plain median wall time).

On the shapes world on a CPU the ratios can be below 1: the stock pipeline runs diffusers' SDPA
attention processor, which is slower at these tiny sizes than the sampler's capturing one, so
compare the two collect figures with each other and the decode share with the denoiser's.
"""

from __future__ import annotations

import argparse
import dataclasses
import statistics
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from addiffusion.collect.config import CollectConfig

PHASES = ("denoiser", "decode", "clip", "scorers")


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def run_bench(
    cfg: CollectConfig, batch: int, repeats: int, observers: tuple[str, ...] = ("preview", "vae")
) -> dict[str, Any]:
    """Median seconds of plain generation and of recorded collection for one batch, per
    observation decoder in ``observers`` (interleaved in one run), with the per-phase split of
    collection and ``collect_overhead_ratio`` (collect / plain) of each:
    ``{"plain_s", "observers": {name: {"collect_s", "collect_<phase>_s", "collect_overhead_ratio"}}}``.
    """
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
    from addiffusion.diffusion.backbone import load_preview
    from addiffusion.diffusion.sampler import StepwiseSampler

    # Roots only: branches would add steps that plain generation does not take.
    cfg = dataclasses.replace(cfg, branch_prob=0.0, batch_size=batch)
    specs = plan_episodes(cfg)[:batch]
    if len(specs) < batch:
        raise ValueError(f"bench needs {batch} episodes, the prompt set gives {len(specs)}")
    base = build_sampler(dataclasses.replace(cfg, observe_with="vae"))
    pipe, unet = base.pipe, base.denoiser
    # One sampler per decoder over the same pipeline; each installs its own capture processors.
    samplers: dict[str, tuple[StepwiseSampler, CollectConfig, dict]] = {}
    for name in observers:
        ocfg = dataclasses.replace(cfg, observe_with=name)
        preview = (
            load_preview(cfg.preview, base.device, pipe.vae.dtype) if name == "preview" else None
        )
        sampler = StepwiseSampler(
            pipe, base.scorer, ocfg.sampler, base.extra_scorers, preview=preview
        )
        samplers[name] = (sampler, ocfg, dict(unet.attn_processors))
    capture = next(iter(samplers.values()))[2]
    # The same roots through the stepwise sampler without observations or writing: what the
    # denoising loop alone costs, so that the observations' own overhead shows.
    bare = StepwiseSampler(pipe, base.scorer, cfg.sampler, base.extra_scorers, observe=False)
    bare_processors = dict(unet.attn_processors)
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
                (1, unet.config.in_channels, *base.latent_hw),
                generator=torch.Generator("cpu").manual_seed(sp.seed),
            )
            for sp in specs
        ]
    ).to(base.device, base.dtype)

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

    phases = {o: {k: 0.0 for k in (*PHASES, "writing")} for o in observers}

    def recorded(name: str, tmp: Path, r: int) -> None:
        sampler, ocfg, processors = samplers[name]
        unet.set_attn_processor(dict(processors))
        before = dict(sampler.timings)
        traces = run_with_branches(sampler, ocfg, specs)
        tic = time.perf_counter()
        writer = ShardWriter(tmp / name, r, shard_info(ocfg, sampler))
        for trace in traces:
            _write_trace(writer, ocfg, trace)
        writer.commit()
        phases[name]["writing"] += time.perf_counter() - tic
        for k in PHASES:
            phases[name][k] += sampler.timings.get(k, 0.0) - before.get(k, 0.0)

    def unobserved() -> None:
        unet.set_attn_processor(dict(bare_processors))
        run_with_branches(bare, cfg, specs)

    runs: list[tuple[str, Callable[[Path, int], None]]] = [
        ("plain", lambda tmp, r: plain()),
        ("unobserved", lambda tmp, r: unobserved()),
    ]
    runs += [(o, lambda tmp, r, o=o: recorded(o, tmp, r)) for o in observers]
    times: dict[str, list[float]] = {name: [] for name, _ in runs}
    with torch.no_grad(), tempfile.TemporaryDirectory() as tmp:
        for _, fn in runs:  # warm-up: allocator, kernels, lazy imports
            fn(Path(tmp), 10_000)
        phases = {o: dict.fromkeys(v, 0.0) for o, v in phases.items()}
        for r in range(repeats):
            for name, fn in runs:
                _sync(base.device)
                tic = time.perf_counter()
                fn(Path(tmp), r)
                _sync(base.device)
                times[name].append(time.perf_counter() - tic)
    plain_s = statistics.median(times["plain"])
    unobserved_s = statistics.median(times["unobserved"])
    out: dict[str, Any] = {"plain_s": plain_s, "unobserved_s": unobserved_s, "observers": {}}
    for o in observers:
        res = {"collect_s": statistics.median(times[o])}
        res.update({f"collect_{k}_s": v / repeats for k, v in phases[o].items()})
        res["collect_other_s"] = res["collect_s"] - sum(v / repeats for v in phases[o].values())
        res["collect_overhead_ratio"] = res["collect_s"] / plain_s
        res["observe_overhead_ratio"] = res["collect_s"] / unobserved_s
        out["observers"][o] = res
    return out


def _bench(args: argparse.Namespace) -> int:
    from addiffusion.config import read_params

    if args.plot is not None and not args.profile_blocks:
        raise SystemExit("--plot needs --profile-blocks")
    torch.set_num_threads(args.threads)
    cfg = CollectConfig.from_params(read_params(args.params))
    if args.device:
        cfg = dataclasses.replace(cfg, device=args.device)
    if args.x0_decode_scale is not None:
        cfg = dataclasses.replace(cfg, x0_decode_scale=args.x0_decode_scale)
    if not Path(cfg.model).exists() and Path(cfg.model).parts[:1] == ("models",):
        raise SystemExit(f"{cfg.model} not found: build it with `addiffusion backbone build-tiny`")
    observers = ("preview", "vae") if args.observe_with == "both" else (args.observe_with,)
    res = run_bench(cfg, args.batch, args.repeats, observers)
    print(
        f"bench collect: model={cfg.model} scheduler={cfg.scheduler} n_max={cfg.n_max} "
        f"batch={args.batch} {cfg.height}x{cfg.width} repeats={args.repeats} device={cfg.device} "
        f"x0_decode_scale={cfg.x0_decode_scale} preview={cfg.preview}"
    )
    print(f"  plain        stock pipe(...)            {res['plain_s'] * 1e3:9.1f} ms (median)")
    print(f"  unobserved   stepwise sampler, no obs.  {res['unobserved_s'] * 1e3:9.1f} ms (median)")
    for o, r in res["observers"].items():
        print(
            f"  collect      observe_with={o:<13} {r['collect_s'] * 1e3:9.1f} ms (median; "
            f"x{r['observe_overhead_ratio']:.2f} the unobserved loop)"
        )
        for k in (*PHASES, "writing", "other"):
            v = r[f"collect_{k}_s"]
            print(f"    {k:<10} {v * 1e3:9.1f} ms  {100 * v / r['collect_s']:5.1f}%")
    ratios = {o: r["collect_overhead_ratio"] for o, r in res["observers"].items()}
    first, *rest = observers
    line = f"collect_overhead_ratio={ratios[first]:.2f} (observe_with={first})"
    line += "".join(f" collect_overhead_ratio_{o}={ratios[o]:.2f}" for o in rest)
    print(line)
    if args.profile_blocks:
        from addiffusion.collect.block_profile import print_block_profile

        # The profile times the denoiser's blocks; the observations' decoder does not matter.
        profiled = dataclasses.replace(cfg, observe_with=observers[-1])
        print_block_profile(profiled, args.batch, args.repeats, args.plot)
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
    p.add_argument(
        "--observe-with",
        choices=("both", "preview", "vae"),
        default="both",
        help="decoder(s) of the per-step observations to time: both runs preview and vae "
        "interleaved in one run (the ratio line names preview first)",
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: 1)")
    p.add_argument(
        "--profile-blocks",
        action="store_true",
        help="then profile one more collection per repeat with forward hooks and print where "
        "a denoiser call's time goes per top-level block (attention / resnet / rest)",
    )
    p.add_argument(
        "--plot", type=Path, default=None, help="with --profile-blocks: write a bar chart here"
    )
    p.set_defaults(func=_bench)
