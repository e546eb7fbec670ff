"""Where a denoiser step's time and memory go: forward hooks on the denoiser's top-level blocks.

A :class:`BlockProfiler` hooks a denoiser and accumulates, over every call until :meth:`take`,

* the latency of each *part*: a partition of the call, so parts sum to the denoiser's time.
  UNet (SD 1.5 / SDXL): ``down_blocks.<i>``, ``mid_block``, ``up_blocks.<i>``, each split into
  ``/attention`` (its transformer modules), ``/resnet`` (its resnets) and ``/rest``
  (down/upsamplers), plus ``other`` (conv_in, time and text embeddings, conv_out: the call
  outside the blocks). SD3 transformer: ``transformer_blocks`` in :data:`TRANSFORMER_GROUPS`
  consecutive groups named ``transformer_blocks.<first>-<last>``, each split into
  ``/attention`` (joint attention), ``/mlp`` (the feed-forwards) and ``/rest`` (norms,
  modulation), plus ``other`` (patch embedding, time/text embeddings, the output projection);
* the peak memory of each *block* (UNet block or transformer group) above what was allocated
  when it started: CUDA's ``max_memory_allocated``, else the process RSS sampled at every hook
  (a lower bound of the CPU peak).

On CUDA every hook synchronises the device, which serialises kernels that would otherwise
overlap: profiled steps run somewhat slower than unprofiled ones (profile to see the split, not
to time the whole). Resetting CUDA's peak statistics per block would hide earlier peaks from a
caller measuring the whole step, so the profiler folds them into :attr:`BlockProfile.cuda_peak`.
"""

from __future__ import annotations

import time
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

TRANSFORMER_GROUPS = 4
"""SD3-style transformers: ``transformer_blocks`` are profiled in this many consecutive groups."""


@dataclass(frozen=True)
class BlockLayout:
    """Names of what a profile holds: ``parts`` (latency, a partition of the call) and
    ``blocks`` (peak memory). Recorded in the shard's ``block_profile``."""

    parts: tuple[str, ...]
    blocks: tuple[str, ...]

    def to_dict(self) -> dict[str, list[str]]:
        return {"parts": list(self.parts), "blocks": list(self.blocks)}


@dataclass(frozen=True)
class BlockProfile:
    """What the denoiser calls since the last :meth:`BlockProfiler.take` cost.

    times_s: (len(layout.parts),) float64 seconds; peak_bytes: (len(layout.blocks),) int64, the
    largest over the calls; cuda_peak: the largest CUDA ``max_memory_allocated`` seen (0 on
    CPU); calls: denoiser calls covered."""

    times_s: np.ndarray
    peak_bytes: np.ndarray
    cuda_peak: int
    calls: int


def _units(denoiser: nn.Module) -> list[tuple[str, nn.Module, dict[str, list[nn.Module]]]]:
    """(block name, hooked module, {part: sub-modules}) of each top-level unit of ``denoiser``."""
    if hasattr(denoiser, "down_blocks") and hasattr(denoiser, "up_blocks"):
        named = [(f"down_blocks.{i}", b) for i, b in enumerate(denoiser.down_blocks)]
        if getattr(denoiser, "mid_block", None) is not None:
            named.append(("mid_block", denoiser.mid_block))
        named += [(f"up_blocks.{i}", b) for i, b in enumerate(denoiser.up_blocks)]
        return [
            (
                name,
                block,
                {
                    "attention": list(getattr(block, "attentions", None) or []),
                    "resnet": list(block.resnets),
                },
            )
            for name, block in named
        ]
    if hasattr(denoiser, "transformer_blocks"):
        blocks = list(denoiser.transformer_blocks)
        size = -(-len(blocks) // TRANSFORMER_GROUPS)
        out = []
        for j, blk in enumerate(blocks):
            first = j // size * size
            group = f"transformer_blocks.{first}-{min(first + size, len(blocks)) - 1}"
            attn = [
                m
                for m in (getattr(blk, "attn", None), getattr(blk, "attn2", None))
                if m is not None
            ]
            mlp = [
                m
                for m in (getattr(blk, "ff", None), getattr(blk, "ff_context", None))
                if m is not None
            ]
            out.append((group, blk, {"attention": attn, "mlp": mlp}))
        return out
    raise ValueError(
        f"cannot profile {type(denoiser).__name__}: expected a UNet (down_blocks / up_blocks) "
        "or a transformer (transformer_blocks)"
    )


def _rss() -> int:
    import psutil

    return int(psutil.Process().memory_info().rss)


class BlockProfiler:
    """Forward hooks on ``denoiser``'s top-level blocks; :meth:`take` returns and clears what
    they measured. Use as a context manager, or call :meth:`remove` to unhook."""

    def __init__(self, denoiser: nn.Module) -> None:
        units = _units(denoiser)
        self.cuda = next(denoiser.parameters()).device.type == "cuda"
        self.device = next(denoiser.parameters()).device
        blocks = list(dict.fromkeys(name for name, _, _ in units))
        kinds = list(dict.fromkeys(k for _, _, parts in units for k in parts))
        parts = [f"{b}/{k}" for b in blocks for k in (*kinds, "rest")] + ["other"]
        self.layout = BlockLayout(tuple(parts), tuple(blocks))
        self._handles: list[Any] = []
        self._start: dict[int, float] = {}
        self._base: dict[int, int] = {}
        self._rss_peak = 0
        self._clear()
        self._hook(denoiser, self._enter_call, self._leave_call)
        for name, module, sub in units:
            self._hook(module, self._enter_block, lambda m, n=name: self._leave_block(m, n))
            for kind, modules in sub.items():
                for m in modules:
                    self._hook(m, self._enter, lambda m, p=f"{name}/{kind}": self._leave(m, p))

    # hooks
    def _hook(self, module: nn.Module, enter: Any, leave: Any) -> None:
        self._handles.append(module.register_forward_pre_hook(lambda m, args: enter(m)))
        self._handles.append(module.register_forward_hook(lambda m, args, out: leave(m)))

    def _now(self) -> float:
        if self.cuda:
            torch.cuda.synchronize(self.device)
        else:
            self._rss_peak = max(self._rss_peak, _rss())
        return time.perf_counter()

    def _enter(self, m: nn.Module) -> None:
        self._start[id(m)] = self._now()

    def _leave(self, m: nn.Module, part: str) -> None:
        self._times[part] += self._now() - self._start.pop(id(m))

    def _enter_call(self, m: nn.Module) -> None:
        self._enter(m)
        self.calls += 1

    def _leave_call(self, m: nn.Module) -> None:
        self._times["_call"] += self._now() - self._start.pop(id(m))

    def _enter_block(self, m: nn.Module) -> None:
        if self.cuda:
            self._cuda_peak = max(
                self._cuda_peak, int(torch.cuda.max_memory_allocated(self.device))
            )
            torch.cuda.reset_peak_memory_stats(self.device)
            self._base[id(m)] = int(torch.cuda.memory_allocated(self.device))
        else:
            self._rss_peak = self._base[id(m)] = _rss()
        self._enter(m)

    def _leave_block(self, m: nn.Module, block: str) -> None:
        self._times[f"_block:{block}"] += self._now() - self._start.pop(id(m))
        if self.cuda:
            peak = int(torch.cuda.max_memory_allocated(self.device))
            self._cuda_peak = max(self._cuda_peak, peak)
        else:
            peak = self._rss_peak
        self._peaks[block] = max(self._peaks[block], peak - self._base.pop(id(m)))

    def _clear(self) -> None:
        self._times: defaultdict[str, float] = defaultdict(float)
        self._peaks: defaultdict[str, int] = defaultdict(int)
        self._cuda_peak = 0
        self.calls = 0

    # API
    def take(self) -> BlockProfile:
        """The profile of every denoiser call since the last ``take`` (or the start); clears it."""
        t = self._times
        times = {}
        for b in self.layout.blocks:
            inner = [p for p in self.layout.parts if p.startswith(f"{b}/") and p != f"{b}/rest"]
            times.update({p: t[p] for p in inner})
            times[f"{b}/rest"] = max(t[f"_block:{b}"] - sum(t[p] for p in inner), 0.0)
        blocks_total = sum(t[f"_block:{b}"] for b in self.layout.blocks)
        times["other"] = max(t["_call"] - blocks_total, 0.0)
        out = BlockProfile(
            times_s=np.array([times[p] for p in self.layout.parts], np.float64),
            peak_bytes=np.array([self._peaks[b] for b in self.layout.blocks], np.int64),
            cuda_peak=self._cuda_peak,
            calls=self.calls,
        )
        self._clear()
        return out

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()

    def __enter__(self) -> BlockProfiler:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()


def summarize(layout: BlockLayout, profiles: list[BlockProfile]) -> list[tuple[str, float, float]]:
    """(part, mean ms per denoiser call, share of the call) over ``profiles``, in layout order."""
    calls = sum(p.calls for p in profiles)
    if calls == 0:
        raise ValueError("no denoiser call was profiled")
    total = np.sum([p.times_s for p in profiles], axis=0)
    return [
        (name, 1e3 * float(s) / calls, float(s / total.sum()))
        for name, s in zip(layout.parts, total, strict=True)
    ]


def plot_parts(rows: list[tuple[str, float, float]], title: str) -> Any:
    """A horizontal bar chart (matplotlib figure) of ms per call per part, attention / resnet or
    mlp / rest coloured apart."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    colours = {"attention": "tab:blue", "resnet": "tab:orange", "mlp": "tab:orange"}
    fig, ax = plt.subplots(figsize=(7, 0.25 * len(rows) + 1.2))
    names = [r[0] for r in rows][::-1]
    ms = [r[1] for r in rows][::-1]
    ax.barh(names, ms, color=[colours.get(n.rsplit("/", 1)[-1], "tab:gray") for n in names])
    ax.set_xlabel("ms per denoiser call")
    ax.set_title(title)
    ax.tick_params(axis="y", labelsize=7)
    fig.tight_layout()
    return fig
