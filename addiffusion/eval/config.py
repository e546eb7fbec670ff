"""``eval`` section of ``params.yaml``: baselines, heuristics, seeds and statistics of evaluation."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from addiffusion.config import StageConfig, check


@dataclass(frozen=True)
class EvalConfig(StageConfig):
    """Compare fixed-step samplers, heuristics and learned policies on the held-out prompts.

    Every method runs the same (prompt, seed) pairs, so the initial noise is shared and
    comparisons between methods are paired.
    """

    section: ClassVar[str] = "eval"

    baseline_steps: list[int] = field(default_factory=lambda: [1, 2, 3, 4, 5, 6, 7, 8, 12, 16])
    """k of the fixed schedules: every solver of ``solvers`` with a k-point schedule, run to the
    end (NFE = k). Named ``<solver>-<k>``, e.g. ``ddim-4``; they draw the fixed frontier."""
    solvers: list[str] = field(default_factory=list)
    """Solvers of the fixed schedules (empty: every solver that fits the backbone: ddim,
    dpmsolver++, euler, unipc; flow-matching models: flowmatch-euler)."""
    grids: list[str] = field(default_factory=lambda: ["uniform", "ays"])
    """Base grids of the fixed schedules: ``uniform`` (``<solver>-<k>``: ``set_timesteps(k)``)
    and/or ``ays`` (``<solver>-ays-<k>``: an Align-Your-Steps-style k-point grid, for the solvers
    that take custom timesteps: ddim, dpmsolver++, euler, flowmatch-euler)."""
    best_of: list[int] = field(default_factory=lambda: [2])
    """Best-of-N baselines: N seeds of the dataset's solver, the CLIP score picks (NFE = N·k)."""
    best_of_steps: list[int] = field(default_factory=lambda: [2, 4])
    """k of the best-of-N baselines."""
    random_stride: bool = True
    """Also run a policy that jumps by a uniformly random stride at every point."""
    stability_thresholds: list[float] = field(default_factory=lambda: [0.9, 0.97])
    """Heuristic ``stability>=x``: stop at the first step whose x̂0 features have cosine
    similarity >= x with the previous step's (on the dataset's n_max schedule)."""
    clip_delta_thresholds: list[float] = field(default_factory=lambda: [0.002, 0.01])
    """Heuristic ``clip-delta<x``: stop at the first step whose CLIP-score gain over the previous
    step is below x."""
    patience: list[int] = field(default_factory=lambda: [2])
    """Heuristic ``patience-<n>``: stop once the CLIP score has not beaten its best so far by
    more than ``patience_min_gain`` for n consecutive points."""
    patience_min_gain: float = 0.002
    """The gain that counts as progress for the patience heuristics."""
    progress_tolerances: list[float] = field(default_factory=lambda: [0.02, 0.05])
    """Heuristic ``progress<=x``: the adaptive schedule taking, at every point, the longest
    jump whose predicted x̂0 change ``stride * (1 - stability)`` is <= x."""
    adaptive_diffusion_thresholds: list[float] = field(default_factory=lambda: [0.01, 0.05])
    """AdaptiveDiffusion baselines ``adaptive-diffusion<=x`` on the dataset's grid: reuse the last
    denoiser output (0 NFE) while the third-order latent difference is <= x times the first."""
    adaptive_diffusion_max_skips: int = 4
    """Cap on consecutive reuses of the AdaptiveDiffusion baselines."""
    checkpoints: bool = True
    """Also roll out every offline checkpoint that has an FQE value (``ope.json`` of the
    offline_rl run) and report FQE against rollout: Spearman rank correlation, and checkpoint
    selection by FQE against selection by validation rollout."""
    pairs: list[str] = field(default_factory=lambda: ["ppo:iql", "ppo:ppo-scratch"])
    """Paired comparisons ``a:b`` of two learned methods (a - b with prompt-cluster bootstrap
    intervals); a pair whose methods were not evaluated is skipped."""
    seeds_per_prompt: int = 2
    """Seeds per held-out prompt; seed s of prompt p is ``seed * 1_000_003 + p * seeds_per_prompt
    + s`` (the collector's formula, so eval.seed = collect.seed reuses the held-out episodes')."""
    n_prompts: int = 0
    """How many held-out prompts to evaluate, in prompt-id order (0 = all)."""
    batch_size: int = 8
    """Episodes denoised together."""
    bootstrap_samples: int = 2000
    """Paired bootstrap resamples for the confidence intervals of policy - baseline."""
    confidence: float = 0.95
    """Level of the bootstrap confidence intervals."""
    seed: int = 0
    """Seed of the evaluation seeds and of the bootstrap."""
    device: str = "auto"
    """auto (cuda if available), cpu, cuda or cuda:N."""

    def __post_init__(self) -> None:
        s = self.section
        check(len(self.baseline_steps) >= 1, f"{s}.baseline_steps", "a non-empty list", [])
        for i, k in enumerate(self.baseline_steps):
            check(k >= 1, f"{s}.baseline_steps[{i}]", ">= 1", k)
        check(
            len(set(self.baseline_steps)) == len(self.baseline_steps),
            f"{s}.baseline_steps",
            "a list without repeats",
            self.baseline_steps,
        )
        from addiffusion.diffusion.backbone import SCHEDULERS

        for i, solver in enumerate(self.solvers):
            check(
                solver in SCHEDULERS, f"{s}.solvers[{i}]", f"one of {', '.join(SCHEDULERS)}", solver
            )
        check(
            len(self.grids) >= 1
            and set(self.grids) <= {"uniform", "ays"}
            and len(set(self.grids)) == len(self.grids),
            f"{s}.grids",
            "a non-empty list of distinct uniform, ays",
            self.grids,
        )
        for i, n in enumerate(self.best_of):
            check(n >= 2, f"{s}.best_of[{i}]", ">= 2", n)
        for i, k in enumerate(self.best_of_steps):
            check(k >= 1, f"{s}.best_of_steps[{i}]", ">= 1", k)
        for i, x in enumerate(self.stability_thresholds):
            check(-1.0 <= x <= 1.0, f"{s}.stability_thresholds[{i}]", "in [-1, 1] (a cosine)", x)
        for i, n in enumerate(self.patience):
            check(n >= 1, f"{s}.patience[{i}]", ">= 1", n)
        for i, x in enumerate(self.adaptive_diffusion_thresholds):
            check(x >= 0, f"{s}.adaptive_diffusion_thresholds[{i}]", ">= 0", x)
        check(
            self.adaptive_diffusion_max_skips >= 1,
            f"{s}.adaptive_diffusion_max_skips",
            ">= 1",
            self.adaptive_diffusion_max_skips,
        )
        for i, x in enumerate(self.progress_tolerances):
            check(x > 0, f"{s}.progress_tolerances[{i}]", "> 0", x)
        for name in ("seeds_per_prompt", "batch_size", "bootstrap_samples"):
            value = getattr(self, name)
            check(value >= 1, f"{s}.{name}", ">= 1", value)
        check(self.n_prompts >= 0, f"{s}.n_prompts", ">= 0 (0 = all held-out)", self.n_prompts)
        check(0.0 < self.confidence < 1.0, f"{s}.confidence", "in (0, 1)", self.confidence)
        check(self.seed >= 0, f"{s}.seed", ">= 0", self.seed)
        for i, pair in enumerate(self.pairs):
            a, _, b = pair.partition(":")
            check(bool(a) and bool(b) and a != b, f"{s}.pairs[{i}]", "'a:b' of two methods", pair)
        check(
            self.device in ("auto", "cpu", "cuda") or self.device.startswith("cuda:"),
            f"{s}.device",
            "auto, cpu, cuda or cuda:N",
            self.device,
        )

    def pair_list(self) -> list[tuple[str, str]]:
        """``pairs`` as (a, b) tuples."""
        return [(p.partition(":")[0], p.partition(":")[2]) for p in self.pairs]
