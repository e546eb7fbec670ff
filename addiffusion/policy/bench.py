"""``addiffusion bench policy``: wall time of the drop-in adaptive sampler against the stock pipeline.

In one process, on one pipeline (``--model``, default the package's backbone, with its own
scheduler), for the same prompts and the same per-image seeds (``torch.Generator().manual_seed``):

* stock: ``pipe(prompts, num_inference_steps=<the pipeline's default>, guidance_scale, height,
  width, generator, output_type="np")`` with the policy's guidance and size, and
* adaptive: ``AdaptiveDiffusionPipeline(pipe, policy)(prompts, generator, output_type="np")``,
  where the policy picks the schedule (jumps, stop, refine) and the sampler scores x̂0 with CLIP
  at every decision.

One warm-up batch of each, then ``--repeats`` rounds; in each round every batch runs stock then
adaptive (ABAB, so that drift in the machine hits both). CUDA is synchronised around each timed
call. Forward hooks on the denoiser count its calls and time (CUDA events on GPU), so the table
says where the time goes: the denoiser's share, and the rest (text encoding, decoding, the
scheduler; for the adaptive sampler also the per-decision x̂0 decodes, CLIP features and the
policy). Prints, per method, images, NFE per image, seconds per image (median round), the
denoiser's share of the time and its calls per round, and ends with one line::

    policy_speedup=<stock s / adaptive s> policy_overhead=<share of adaptive time outside the denoiser>

A speedup above 1 means the adaptive sampler is faster in wall time; it is not the NFE ratio,
since every decision also costs an x̂0 decode and CLIP features.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

if TYPE_CHECKING:  # diffusers is imported only when the benchmark runs
    from diffusers import DiffusionPipeline

    from addiffusion.policy.package import AdaptivePolicy

METHODS = ("stock", "adaptive")


@dataclass(frozen=True)
class PolicyBench:
    """Timings of one ``bench_policy`` run; seconds are wall time, per method."""

    n_images: int
    batch_size: int
    repeats: int
    stock_nfe: int
    """NFE per image of the stock run: the pipeline's default ``num_inference_steps``."""
    adaptive_nfe: float
    """Mean NFE per image the policy spent (classifier-free guidance counted once)."""
    stock_rounds_s: tuple[float, ...]
    """Seconds of each round over all the prompts."""
    adaptive_rounds_s: tuple[float, ...]
    stock_s_per_image: float
    """Median round divided by the number of images."""
    adaptive_s_per_image: float
    stock_denoiser_calls: int
    """Denoiser forward calls per round (one call holds a whole batch, both CFG branches)."""
    adaptive_denoiser_calls: int
    stock_denoiser_share: float
    """Share of the method's timed wall time spent inside the denoiser's forward."""
    adaptive_denoiser_share: float
    policy_speedup: float
    """Stock median round / adaptive median round (> 1: the adaptive sampler is faster)."""
    policy_overhead: float
    """Share of the adaptive wall time outside the denoiser (1 - adaptive_denoiser_share)."""

    @property
    def stock_overhead(self) -> float:
        return 1.0 - self.stock_denoiser_share


class DenoiserClock:
    """Counts and times a module's forward calls with pre/post hooks while ``hooked()`` is open.

    On CUDA the time is the span between CUDA events recorded around each call, so the hooks do
    not synchronise (and do not change what they measure); read ``seconds`` after a sync."""

    def __init__(self, module: torch.nn.Module) -> None:
        self.module = module
        self.cuda = next(module.parameters()).device.type == "cuda"
        self.calls = 0
        self._cpu_s = 0.0
        self._events: list[tuple[Any, Any]] = []
        self._tic: Any = None

    def _pre(self, *_: Any) -> None:
        self.calls += 1
        if self.cuda:
            self._tic = torch.cuda.Event(enable_timing=True)
            self._tic.record()
        else:
            self._tic = time.perf_counter()

    def _post(self, *_: Any) -> None:
        if self.cuda:
            toc = torch.cuda.Event(enable_timing=True)
            toc.record()
            self._events.append((self._tic, toc))
        else:
            self._cpu_s += time.perf_counter() - self._tic

    @property
    def seconds(self) -> float:
        return self._cpu_s + sum(a.elapsed_time(b) for a, b in self._events) / 1e3

    def reset(self) -> None:
        self.calls, self._cpu_s, self._events = 0, 0.0, []

    @contextmanager
    def hooked(self) -> Iterator[DenoiserClock]:
        handles = [
            self.module.register_forward_pre_hook(self._pre),
            self.module.register_forward_hook(self._post),
        ]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()


def load_stock(
    model: str, device: str = "auto", dtype: torch.dtype = torch.float32, drop: tuple[str, ...] = ()
) -> DiffusionPipeline:
    """The stock pipeline ``model`` (folder or Hub id) with its own scheduler, progress bar off,
    on ``device`` (``auto``: CUDA when present) in ``dtype``; ``drop``: components loaded as None
    (as the policy's backbone was)."""
    from diffusers import DiffusionPipeline

    from addiffusion.diffusion.backbone import resolve_device

    pipe = DiffusionPipeline.from_pretrained(model, dtype=dtype, **dict.fromkeys(drop, None))
    pipe.set_progress_bar_config(disable=True)
    return pipe.to(resolve_device(device))


def bench_policy(
    pipe: DiffusionPipeline,
    policy: AdaptivePolicy,
    prompts: list[str],
    seeds: list[int],
    batch_size: int = 8,
    repeats: int = 3,
) -> PolicyBench:
    """Time the stock ``pipe`` at its default steps against ``AdaptiveDiffusionPipeline(pipe,
    policy)`` on ``prompts`` (image i from ``torch.Generator().manual_seed(seeds[i])``), in
    batches of ``batch_size``, over ``repeats`` interleaved rounds (see the module docstring)."""
    from tqdm.auto import tqdm

    from addiffusion.diffusion.backbone import denoiser_of
    from addiffusion.policy.pipeline import AdaptiveDiffusionPipeline, default_steps

    if len(prompts) != len(seeds) or not prompts:
        raise ValueError(
            f"need one seed per prompt, got {len(prompts)} prompts, {len(seeds)} seeds"
        )
    if batch_size < 1 or repeats < 1:
        raise ValueError(f"batch_size and repeats must be >= 1, got {batch_size}, {repeats}")
    adaptive = AdaptiveDiffusionPipeline(pipe, policy)
    s = adaptive.settings
    steps = default_steps(pipe)
    device = denoiser_of(pipe).device
    batches = [
        (prompts[i : i + batch_size], seeds[i : i + batch_size])
        for i in range(0, len(prompts), batch_size)
    ]
    nfe: list[int] = []

    def gens(batch_seeds: list[int]) -> list[torch.Generator]:
        return [torch.Generator().manual_seed(int(seed)) for seed in batch_seeds]

    def stock(texts: list[str], batch_seeds: list[int]) -> None:
        pipe(
            texts,
            num_inference_steps=steps,
            guidance_scale=s.guidance_scale,
            height=s.height,
            width=s.width,
            generator=gens(batch_seeds),
            output_type="np",
        )

    def adapt(texts: list[str], batch_seeds: list[int]) -> None:
        out = adaptive(texts, generator=gens(batch_seeds), output_type="np")
        nfe.extend(t.nfe for t in out.traces)

    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    runs: dict[str, Callable[[list[str], list[int]], None]] = {"stock": stock, "adaptive": adapt}
    clocks = {name: DenoiserClock(denoiser_of(pipe)) for name in METHODS}
    rounds: dict[str, list[float]] = {name: [] for name in METHODS}
    with torch.no_grad():
        for name in METHODS:  # warm-up: allocator, kernels, lazy imports, CLIP weights
            runs[name](*batches[0])
        nfe.clear()
        bar = tqdm(total=repeats * len(batches), desc="bench policy", unit="batch", disable=None)
        for _ in range(repeats):
            spent = dict.fromkeys(METHODS, 0.0)
            for texts, batch_seeds in batches:
                for name in METHODS:
                    with clocks[name].hooked():
                        sync()
                        tic = time.perf_counter()
                        runs[name](texts, batch_seeds)
                        sync()
                        spent[name] += time.perf_counter() - tic
                bar.update()
            for name in METHODS:
                rounds[name].append(spent[name])
        bar.close()
    sync()
    median = {name: statistics.median(rounds[name]) for name in METHODS}
    share = {name: clocks[name].seconds / sum(rounds[name]) for name in METHODS}
    return PolicyBench(
        n_images=len(prompts),
        batch_size=batch_size,
        repeats=repeats,
        stock_nfe=steps,
        adaptive_nfe=sum(nfe) / len(nfe),
        stock_rounds_s=tuple(rounds["stock"]),
        adaptive_rounds_s=tuple(rounds["adaptive"]),
        stock_s_per_image=median["stock"] / len(prompts),
        adaptive_s_per_image=median["adaptive"] / len(prompts),
        stock_denoiser_calls=clocks["stock"].calls // repeats,
        adaptive_denoiser_calls=clocks["adaptive"].calls // repeats,
        stock_denoiser_share=share["stock"],
        adaptive_denoiser_share=share["adaptive"],
        policy_speedup=median["stock"] / median["adaptive"],
        policy_overhead=1.0 - share["adaptive"],
    )


def format_table(b: PolicyBench) -> str:
    rows = [
        f"{'method':<9} {'images':>6} {'NFE/image':>9} {'s/image':>9} {'denoiser':>8} {'calls/round':>11}",
        f"{'stock':<9} {b.n_images:>6d} {b.stock_nfe:>9.2f} {b.stock_s_per_image:>9.4f} "
        f"{b.stock_denoiser_share:>8.1%} {b.stock_denoiser_calls:>11d}",
        f"{'adaptive':<9} {b.n_images:>6d} {b.adaptive_nfe:>9.2f} {b.adaptive_s_per_image:>9.4f} "
        f"{b.adaptive_denoiser_share:>8.1%} {b.adaptive_denoiser_calls:>11d}",
        f"policy_speedup={b.policy_speedup:.3f} policy_overhead={b.policy_overhead:.3f}",
    ]
    return "\n".join(rows)


def _main(args: argparse.Namespace) -> int:
    from addiffusion.collect.prompts import load_prompts
    from addiffusion.policy.package import AdaptivePolicy

    if args.threads > 0:
        torch.set_num_threads(args.threads)
    policy = AdaptivePolicy.from_pretrained(str(args.policy))
    cfg = policy.config
    model = args.model or cfg.backbone
    records = load_prompts(args.prompts, args.n_prompts, heldout_fraction=1.0, seed=args.seed)
    records = records[: args.n_prompts]
    if len(records) < args.n_prompts:
        raise SystemExit(
            f"--prompts {args.prompts} gives {len(records)} prompts, --n-prompts asks for "
            f"{args.n_prompts}"
        )
    pipe = load_stock(model, args.device, getattr(torch, args.dtype), cfg.drop_components)
    prompts = [r.text for r in records]
    seeds = [args.seed + i for i in range(len(prompts))]
    bench = bench_policy(pipe, policy, prompts, seeds, args.batch_size, args.repeats)
    print(
        f"bench policy: policy={args.policy} model={model} stock scheduler="
        f"{type(pipe.scheduler).__name__} at {bench.stock_nfe} steps, policy solver={cfg.solver} "
        f"n_max={cfg.settings().n_max}; prompts={args.prompts} batch={args.batch_size} "
        f"repeats={args.repeats} device={pipe.device} dtype={args.dtype} "
        f"threads={torch.get_num_threads()}"
    )
    print(format_table(bench))
    if args.json:
        data = {
            **dataclasses.asdict(bench),
            "stock_overhead": bench.stock_overhead,
            "policy": str(args.policy),
            "model": model,
            "prompts": args.prompts,
            "device": str(pipe.device),
            "dtype": args.dtype,
            "threads": torch.get_num_threads(),
        }
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(data, indent=2) + "\n")
    return 0


def _positive(value: str) -> int:
    n = int(value)
    if n < 1:
        raise argparse.ArgumentTypeError(f"expected an integer >= 1, got {value}")
    return n


def register_bench(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser(
        "policy",
        help="drop-in adaptive sampler vs the stock pipeline at its default steps, interleaved",
        description=__doc__,
    )
    p.add_argument("--policy", required=True, help="policy package: folder or Hub repo id")
    p.add_argument(
        "--model", default=None, help="diffusers pipeline folder or Hub id (default: the backbone)"
    )
    p.add_argument(
        "--prompts",
        default="shapes",
        help="prompt source as collect reads it: builtin, shapes, a file or hf:<id> "
        "(default: %(default)s)",
    )
    p.add_argument("--n-prompts", type=_positive, default=16, help="images (default: %(default)s)")
    p.add_argument(
        "--batch-size",
        type=_positive,
        default=8,
        help="images per pipeline call, the same for both methods",
    )
    p.add_argument(
        "--repeats", type=_positive, default=3, help="timed rounds (default: %(default)s)"
    )
    p.add_argument("--seed", type=int, default=0, help="shapes prompts; image i uses seed + i")
    p.add_argument(
        "--device", default="auto", choices=("auto", "cpu", "cuda"), help="auto: CUDA when present"
    )
    p.add_argument(
        "--dtype", default="float32", choices=("float32", "float16"), help="pipeline dtype"
    )
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (0 = torch's choice)")
    p.add_argument("--json", default=None, metavar="PATH", help="write every number as JSON here")
    p.set_defaults(func=_main)
