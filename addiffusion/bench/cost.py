"""``addiffusion bench cost``: what one observation of x̂0 costs next to one denoiser step, at
real size.

Every decision of an adaptive sampler observes x̂0: a decode (the full VAE, or a TAESD-style
preview decoder) and one CLIP image forward. A policy that saves a fraction ``f`` of the
denoiser calls but adds that observation to every step saves nothing when the observation costs
as much as the saving. This benchmark builds the SD 1.5-, SDXL- and SD3-medium-sized modules
from their public configs (embedded in ``cost_configs.py``, each named by the Hub id it mirrors)
with random weights, no download, and

* counts FLOPs per call with ``torch.utils.flop_counter.FlopCounterMode`` on the meta device
  (no memory, no time: always reported), and
* times one real call of each on CPU (``--time``, skipped with a printed reason for a family
  whose parameters and activations do not fit in the available memory).

Convention: one denoiser step = one call at batch 2 (classifier-free guidance's two branches);
one observation = one decode of x̂0 (full VAE or preview) + one CLIP ViT-L/14 image forward at
224², batch 1 each. FLOPs count a multiply-add as 2 (``FlopCounterMode``'s convention).

Expected wall-time saving: with ``c`` = observation / step, an adaptive run that takes
``(1 - f) N`` of a fixed schedule's ``N`` steps and observes at each of them costs
``(1 - f)(1 + c)`` of the fixed run (the final decode, paid by both, left out), so it saves
``1 - (1 - f)(1 + c)`` and breaks even at ``f = c / (1 + c)``.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from addiffusion.bench.cost_configs import (
    CLIP_HUB,
    CLIP_MODEL,
    SD3_TRANSFORMER,
    SD3_VAE,
    SD15_UNET,
    SD15_VAE,
    SDXL_UNET,
    SDXL_VAE,
    TAESD,
    TAESD3,
    TINY,
    TINY_CLIP,
)


@dataclass(frozen=True)
class Family:
    """One model family: the denoiser, its VAE and preview decoder, and how to call them."""

    hub_id: str
    denoiser_kind: str  # "unet" | "sdxl_unet" | "transformer"
    denoiser: dict[str, Any]
    vae: dict[str, Any]
    taesd: dict[str, Any]
    taesd_hub: str
    resolution: int
    text_tokens: int  # encoder_hidden_states length (SD3: 77 CLIP + 256 T5 tokens)


FAMILIES: dict[str, Family] = {
    "sd15": Family(
        "runwayml/stable-diffusion-v1-5",
        "unet",
        SD15_UNET,
        SD15_VAE,
        TAESD,
        "madebyollin/taesd",
        512,
        77,
    ),  # fmt: skip
    "sdxl": Family(
        "stabilityai/stable-diffusion-xl-base-1.0",
        "sdxl_unet",
        SDXL_UNET,
        SDXL_VAE,
        TAESD,
        "madebyollin/taesdxl",
        1024,
        77,
    ),  # fmt: skip
    "sd3": Family(
        "stabilityai/stable-diffusion-3-medium-diffusers",
        "transformer",
        SD3_TRANSFORMER,
        SD3_VAE,
        TAESD3,
        "madebyollin/taesd3",
        1024,
        333,
    ),  # fmt: skip
}
PARTS = ("denoiser", "vae", "taesd", "clip")


def _build(family: Family, part: str, tiny: bool) -> torch.nn.Module:
    """One module of ``family`` in the current default device (meta for FLOPs)."""
    from diffusers import (
        AutoencoderKL,
        AutoencoderTiny,
        SD3Transformer2DModel,
        UNet2DConditionModel,
    )

    if part == "clip":
        import open_clip

        name = CLIP_MODEL
        if tiny:
            name = "addiffusion-cost-tiny"
            open_clip.factory._MODEL_CONFIGS[name] = TINY_CLIP
        device = torch.get_default_device()
        logging.disable(logging.WARNING)  # "No pretrained weights loaded": none are wanted
        try:
            return open_clip.create_model(name, pretrained=None, device=device).visual
        finally:
            logging.disable(logging.NOTSET)
    cfg = {"denoiser": family.denoiser, "vae": family.vae, "taesd": family.taesd}[part]
    kind = family.denoiser_kind if part == "denoiser" else part
    cfg = {**cfg, **TINY[kind]} if tiny else cfg
    if part == "vae":
        return AutoencoderKL(**cfg)
    if part == "taesd":
        return AutoencoderTiny(**cfg)
    if kind == "transformer":
        return SD3Transformer2DModel(**cfg)
    return UNet2DConditionModel(**cfg)


def _call(
    family: Family, part: str, module: torch.nn.Module, res: int, dtype: torch.dtype
) -> Callable[[], object]:
    """A closure making one call of ``module`` under the benchmark's convention."""
    dev = next(module.parameters()).device

    def randn(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, device=dev, dtype=dtype)

    h = res // 8
    if part == "clip":
        size = module.image_size[0] if isinstance(module.image_size, tuple) else module.image_size
        x = randn(1, 3, size, size)
        return lambda: module(x)
    if part in ("vae", "taesd"):
        z = randn(1, module.config.latent_channels, h, h)
        return lambda: module.decode(z)
    cfg = module.config
    t = torch.full((2,), 500.0, device=dev)
    if family.denoiser_kind == "transformer":
        x = randn(2, cfg.in_channels, h, h)
        ctx = randn(2, family.text_tokens, cfg.joint_attention_dim)
        pooled = randn(2, cfg.pooled_projection_dim)
        return lambda: module(
            hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t
        )
    x = randn(2, cfg.in_channels, h, h)
    ctx = randn(2, family.text_tokens, cfg.cross_attention_dim)
    extra = {}
    if cfg.addition_embed_type == "text_time":
        text_dim = cfg.projection_class_embeddings_input_dim - 6 * cfg.addition_time_embed_dim
        extra["added_cond_kwargs"] = {"text_embeds": randn(2, text_dim), "time_ids": randn(2, 6)}
    return lambda: module(x, t, encoder_hidden_states=ctx, **extra)


def count_flops(family: Family, part: str, res: int, tiny: bool = False) -> tuple[float, int]:
    """(FLOPs of one call, parameter count), counted on the meta device (no memory, no time)."""
    from torch.utils.flop_counter import FlopCounterMode

    with torch.device("meta"), torch.no_grad():
        module = _build(family, part, tiny)
        call = _call(family, part, module, res, torch.float32)
        with FlopCounterMode(display=False) as counter:
            call()
    return float(counter.get_total_flops()), sum(p.numel() for p in module.parameters())


def _materialize(family: Family, part: str, tiny: bool, dtype: torch.dtype) -> torch.nn.Module:
    """The module on CPU in ``dtype`` with random N(0, 0.02) weights, built without an fp32 copy
    (meta, cast, then allocated): peak memory is the parameters in ``dtype``."""
    with torch.device("meta"):
        # nn.Module.to, not ModelMixin.to: the latter warns about casting without from_pretrained.
        module = torch.nn.Module.to(_build(family, part, tiny), dtype)
    module = module.to_empty(device="cpu").eval()
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for t in [*module.parameters(), *module.buffers()]:
            if t.is_floating_point():
                t.copy_(torch.randn(t.shape, generator=gen) * 0.02)
            else:
                t.zero_()
    return module


def time_call(
    family: Family, part: str, res: int, dtype: torch.dtype, repeats: int, tiny: bool = False
) -> float:
    """Median seconds of one call on CPU. The first call is a warm-up unless it takes over a
    second (then warming up is noise next to the call and counts as the first repeat)."""
    module = _materialize(family, part, tiny, dtype)
    call = _call(family, part, module, res, dtype)
    times: list[float] = []
    warm = False
    # Random weights shrink activations into denormals, which slow a CPU down many times over.
    torch.set_flush_denormal(True)
    try:
        with torch.inference_mode():
            while len(times) < repeats:
                tic = time.perf_counter()
                call()
                times.append(time.perf_counter() - tic)
                if not warm and times[0] < 1.0:
                    times.clear()  # a warm-up
                warm = True
    finally:
        torch.set_flush_denormal(False)  # torch's default
    del module, call
    gc.collect()
    return statistics.median(times)


def _fits(family: Family, params: dict[str, int], res: int, dtype: torch.dtype) -> str | None:
    """None if the largest module fits the available memory, else the reason to skip timing.
    Estimate: its parameters in ``dtype`` + activations ~ 48 bytes per output pixel x 128
    channels (the VAE decoder's last blocks dominate) + 1 GiB of slack."""
    import psutil

    item = torch.tensor([], dtype=dtype).element_size()
    act = 48 * res * res * 128 * item // 4
    need = max(params.values()) * item + act + 2**30
    have = psutil.virtual_memory().available
    if need > have:
        return f"needs ~{need / 2**30:.1f} GiB, {have / 2**30:.1f} GiB available"
    return None


def wall_saving(nfe_saving: float, obs_per_step: float) -> float:
    """Fraction of wall time saved by an adaptive run that needs ``1 - nfe_saving`` of a fixed
    run's denoiser steps and observes x̂0 once per step, the observation costing
    ``obs_per_step`` of a step: ``1 - (1 - f)(1 + c)`` (negative: slower than the fixed run)."""
    return 1.0 - (1.0 - nfe_saving) * (1.0 + obs_per_step)


def measure(
    family_name: str,
    res: int,
    dtype: torch.dtype = torch.float32,
    repeats: int = 1,
    timed: bool = True,
    tiny: bool = False,
) -> dict[str, Any]:
    """One row of the table: GFLOPs and (if timed and it fits) ms per module, and the ratios."""
    family = FAMILIES[family_name]
    row: dict[str, Any] = {"family": family_name, "resolution": res, "hub_id": family.hub_id}
    row["taesd_hub"], row["clip"] = family.taesd_hub, CLIP_HUB
    params = {}
    for part in PARTS:
        flops, params[part] = count_flops(family, part, res, tiny)
        row[f"{part}_gflops"] = flops / 1e9
        row[f"{part}_params_m"] = params[part] / 1e6
    step = row["denoiser_gflops"]
    row["obs_vae_flop_ratio"] = (row["vae_gflops"] + row["clip_gflops"]) / step
    row["obs_preview_flop_ratio"] = (row["taesd_gflops"] + row["clip_gflops"]) / step
    skip = None if timed else "--no-time"
    skip = skip or _fits(family, params, res, dtype)
    row["time_skipped"] = skip
    if skip is None:
        for part in PARTS:
            row[f"{part}_ms"] = 1e3 * time_call(family, part, res, dtype, repeats, tiny)
        step_ms = row["denoiser_ms"]
        row["obs_vae_time_ratio"] = (row["vae_ms"] + row["clip_ms"]) / step_ms
        row["obs_preview_time_ratio"] = (row["taesd_ms"] + row["clip_ms"]) / step_ms
    return row


def _fmt(v: object, spec: str) -> str:
    return "-" if v is None else format(v, spec)


def _num(v: float, width: int) -> str:
    """GFLOPs / ms: whole numbers from 100 up, three significant digits below."""
    return f"{v:>{width},.0f}" if v >= 100 else f"{v:>{width}.3g}"


def format_table(rows: list[dict[str, Any]], nfe_savings: tuple[float, ...]) -> str:
    head = (
        f"{'family@res':<12} {'denoiser':>9} {'vae dec':>9} {'taesd':>7} {'clip':>7} "
        f"{'obs/step vae':>13} {'obs/step prev':>14}"
    )
    lines = ["GFLOPs per call; obs/step = (decode + CLIP) / denoiser step (FLOPs | time)", head]
    for r in rows:
        key = f"{r['family']}@{r['resolution']}"
        lines.append(
            f"{key:<12} {_num(r['denoiser_gflops'], 9)} {_num(r['vae_gflops'], 9)} "
            f"{_num(r['taesd_gflops'], 7)} {_num(r['clip_gflops'], 7)} "
            f"{r['obs_vae_flop_ratio']:>13.3f} {r['obs_preview_flop_ratio']:>14.3f}"
        )
    lines += ["", "ms per call on this CPU", head.replace("GFLOPs", "ms")]
    for r in rows:
        key = f"{r['family']}@{r['resolution']}"
        if r["time_skipped"]:
            lines.append(f"{key:<12} timing skipped: {r['time_skipped']}")
            continue
        lines.append(
            f"{key:<12} {_num(r['denoiser_ms'], 9)} {_num(r['vae_ms'], 9)} "
            f"{_num(r['taesd_ms'], 7)} {_num(r['clip_ms'], 7)} {_fmt(r.get('obs_vae_time_ratio'), '>13.3f')} "
            f"{_fmt(r.get('obs_preview_time_ratio'), '>14.3f')}"
        )
    lines += [
        "",
        "expected wall-time saving = 1 - (1 - f)(1 + c), f = NFE saving, c = obs/step "
        "(time where timed, else FLOPs); break-even f = c / (1 + c)",
        f"{'family@res':<12} {'obs':<8} {'c':>6} {'break-even':>10} "
        + " ".join(f"{f'f={f:.0%}':>7}" for f in nfe_savings),
    ]
    for r in rows:
        for obs in ("vae", "preview"):
            c = r.get(f"obs_{obs}_time_ratio", r[f"obs_{obs}_flop_ratio"])
            savings = " ".join(f"{wall_saving(f, c):>7.1%}" for f in nfe_savings)
            lines.append(
                f"{r['family'] + '@' + str(r['resolution']):<12} {obs:<8} {c:>6.3f} "
                f"{c / (1 + c):>10.1%} " + savings
            )
    lines.append("")
    for r in {r["family"]: r for r in rows}.values():
        lines.append(
            f"{r['family']}: {r['hub_id']} (denoiser {r['denoiser_params_m']:.0f}M, VAE "
            f"{r['vae_params_m']:.0f}M params), preview {r['taesd_hub']}, CLIP {r['clip']}"
        )
    return "\n".join(lines)


def _parse_list(text: str, flag: str, conv: Callable[[str], Any]) -> list[Any]:
    try:
        return [conv(x) for x in text.split(",") if x.strip()]
    except ValueError as e:
        raise SystemExit(f"{flag}: expected a comma-separated list, got {text!r} ({e})") from e


def _bench(args: argparse.Namespace) -> int:
    families = _parse_list(args.families, "--families", str)
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        raise SystemExit(
            f"--families: expected some of {', '.join(FAMILIES)}, got {args.families!r}"
        )
    res = _parse_list(args.resolutions, "--resolutions", int) if args.resolutions else None
    if res is not None and (len(res) != len(families) or any(r < 64 or r % 64 for r in res)):
        raise SystemExit(
            f"--resolutions: one multiple of 64 (>= 64) per family ({len(families)}), "
            f"got {args.resolutions!r}"
        )
    savings = tuple(_parse_list(args.nfe_savings, "--nfe-savings", float))
    if not savings or any(not 0 <= f < 1 for f in savings):
        raise SystemExit(f"--nfe-savings: fractions in [0, 1), got {args.nfe_savings!r}")
    if args.repeats < 1 or args.threads < 1:
        raise SystemExit(
            f"--repeats and --threads must be >= 1, got {args.repeats}, {args.threads}"
        )
    torch.set_num_threads(args.threads)
    dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[args.dtype]
    rows = []
    for j, name in enumerate(families):
        r = res[j] if res else FAMILIES[name].resolution
        rows.append(measure(name, r, dtype, args.repeats, args.time, args.tiny))
        print(f"measured {name}@{r}", flush=True)
    print(
        f"bench cost: dtype={args.dtype} threads={args.threads} repeats={args.repeats} "
        f"tiny={args.tiny}; step = 1 denoiser call at batch 2 (CFG), observation = 1 decode "
        "+ 1 CLIP image forward at batch 1"
    )
    print(format_table(rows, savings))
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        meta = {"dtype": args.dtype, "threads": args.threads, "repeats": args.repeats}
        Path(args.json).write_text(json.dumps({**meta, "rows": rows}, indent=2) + "\n")
    return 0


def register_bench(sub: argparse._SubParsersAction) -> None:
    hubs = "; ".join(f"{k}: {f.hub_id} + {f.taesd_hub}" for k, f in FAMILIES.items())
    p = sub.add_parser(
        "cost",
        help="observation (decode + CLIP) vs one denoiser step at SD 1.5 / SDXL / SD3 size",
        description=__doc__ + f"\nFamilies (configs embedded from): {hubs}; CLIP: {CLIP_HUB}.",
    )
    p.add_argument(
        "--families", default=",".join(FAMILIES), help="comma-separated (default: %(default)s)"
    )
    p.add_argument(
        "--resolutions",
        default=None,
        help="comma-separated image sizes, one per family (default: 512 for sd15, 1024 for "
        "sdxl and sd3)",
    )
    p.add_argument(
        "--dtype",
        choices=("float32", "bfloat16"),
        default="float32",
        help="dtype of the timed calls (bfloat16 halves the memory: SDXL's UNet is 10 GB in fp32)",
    )
    p.add_argument("--repeats", type=int, default=1, help="timed calls per module (median)")
    p.add_argument("--threads", type=int, default=2, help="torch CPU threads (default: 2)")
    p.add_argument(
        "--time",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="time one real call of each module (FLOPs are always counted)",
    )
    p.add_argument(
        "--nfe-savings",
        default="0.2,0.4,0.6",
        help="NFE savings to convert to wall-time savings (default: %(default)s)",
    )
    p.add_argument("--tiny", action="store_true", help="channel-scaled configs (for tests)")
    p.add_argument("--json", default=None, help="also write the rows to this JSON file")
    p.set_defaults(func=_bench)
