"""Variable-stride solver steps on a fine grid of timesteps.

The stepwise sampler keeps, per episode, a copy of the pipeline's scheduler on which
``set_timesteps(n_max)`` was called: ``scheduler.timesteps`` (``n`` entries) is the *fine grid*,
grid index ``i`` is the point ``t_i`` and index ``n`` stands for the end of the schedule. A policy
jumps from ``i`` to any ``j > i`` and the denoiser runs only at the visited points;
:func:`solver_step` takes that one step from the guided model output at ``t_i``.

Solvers (all coefficients in float32, from the scheduler's own arrays and config):

* ``DDIMScheduler`` (eta 0) is exact between any two timesteps:
  ``x_j = sqrt(ab_j) x0 + sqrt(1 - ab_j) eps`` with ``ab = alphas_cumprod[t]`` and
  ``final_alpha_cumprod`` at the end; ``clip_sample`` / ``thresholding`` act on x0 as in the
  stock step (eps from the unclipped output, as ``use_clipped_model_output=False`` does). The
  target level is always ``alphas_cumprod[t_j]``; the stock step instead goes to
  ``t_i - num_train_timesteps // n``, which is the next grid point only when the grid is evenly
  spaced (e.g. ``trailing`` spacing with ``n`` dividing ``num_train_timesteps``); elsewhere a
  stride-1 step here lands exactly on ``t_{i+1}`` where the stock one lands a timestep or so off.
* ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"`` and ``solver_order`` 1 or
  2: step-size-aware DPM-Solver++(2M) (``midpoint`` or ``heun``) on ``scheduler.sigmas`` (VP
  sigma; flow sigmas when ``use_flow_sigmas``), with the previous *visited* point's x0 and lambda
  (:class:`SolverHistory`) as the second point, so ``h_0 = lambda_i - lambda_prev`` follows the
  path's own strides. First order on the first step (empty history) and on the final step
  (``j == n``) when the stock scheduler's final step is first order on this grid: its final
  sigma is 0 (``final_sigmas_type="zero"``), ``euler_at_final``, or ``lower_order_final`` and
  ``n < 15``. The ``< 15`` count is the fine grid's (stock uses its own schedule's length, and
  a path's point count is not known in advance), so a stride-1 path equals the stock scheduler
  at ``n`` steps exactly, and a stride-``s`` path equals stock at ``n / s`` steps whenever both
  counts fall on the same side of 15 or the final sigma is 0 (the default).
* ``FlowMatchEulerDiscreteScheduler`` (deterministic): ``x_j = x_i + (sigma_j - sigma_i) v`` on
  ``scheduler.sigmas`` (terminal 0 at the end).

Sub-grid parity with a coarse stock schedule: with ``timestep_spacing="trailing"`` (and ``n``
divisible by the stride) the stock ``n / s``-step schedule of DDIM / DPM++ is every ``s``-th point
of the ``n``-point grid, so a constant stride-``s`` path reproduces the stock ``n / s``-step
sampler. Flow-matching sigmas are ``linspace`` in ``t`` and *not* nested across step counts; a
stride-``s`` path equals the stock sampler run with ``sigmas=`` the path's own sigmas (pass them
unshifted, i.e. with ``shift=1`` and no dynamic shifting, as ``set_timesteps`` shifts custom
sigmas again).

Other schedulers (Euler, UniPC, DPM++ of order 3 or SDE variants, stochastic flow sampling...)
only take stride 1, through their own stateful ``scheduler.step``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from diffusers import DDIMScheduler, DPMSolverMultistepScheduler, FlowMatchEulerDiscreteScheduler

__all__ = ["SolverHistory", "solver_step", "variable_stride"]


def variable_stride(scheduler: object) -> bool:
    """True when :func:`solver_step` can jump ``i -> j`` for any ``j > i``: ``DDIMScheduler``,
    ``DPMSolverMultistepScheduler`` with ``algorithm_type="dpmsolver++"``, ``solver_order`` 1 or 2
    and ``solver_type`` midpoint / heun, and deterministic ``FlowMatchEulerDiscreteScheduler``.
    False for the others (Euler, UniPC, ...), which only take stride 1 through their own
    ``scheduler.step``."""
    cfg = getattr(scheduler, "config", {})
    if isinstance(scheduler, DDIMScheduler):
        return True
    if isinstance(scheduler, DPMSolverMultistepScheduler):
        return (
            cfg.algorithm_type == "dpmsolver++"
            and cfg.solver_order in (1, 2)
            and cfg.solver_type in ("midpoint", "heun")
        )
    if isinstance(scheduler, FlowMatchEulerDiscreteScheduler):
        return not cfg.get("stochastic_sampling", False) and not cfg.get("invert_sigmas", False)
    return False


@dataclass
class SolverHistory:
    """Per-episode multistep memory (DPM-Solver++(2M)): the previous visited point's x0
    prediction and lambda.

    ``x0``: (B, C, h, w) float32 data prediction at the last point stepped from (None before the
    first step); ``lam``: its log-SNR ``lambda = log alpha - log sigma`` (0-dim float32 tensor);
    ``index``: its grid index. :func:`solver_step` replaces the fields (never writes into the
    tensors), so ``copy.copy`` forks a history safely. Use a fresh one per episode.
    """

    x0: torch.Tensor | None = None
    lam: torch.Tensor | None = None
    index: int | None = None

    @property
    def empty(self) -> bool:
        return self.x0 is None


def _stride_one_only(scheduler: object, i: int, j: int) -> ValueError:
    return ValueError(
        f"{type(scheduler).__name__} offers only stride 1 (its own stateful scheduler.step); "
        f"cannot step from grid index {i} to {j} (stride {j - i}). Variable strides need DDIM, "
        "DPM-Solver++ (order <= 2) or deterministic flow-matching Euler."
    )


def _vp_x0_eps(
    kind: str, x: torch.Tensor, out: torch.Tensor, ab: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """x0 and eps from a VP model output of ``prediction_type`` ``kind`` at ``alpha_bar`` ab."""
    a, b = ab**0.5, (1 - ab) ** 0.5
    if kind == "epsilon":
        return (x - b * out) / a, out
    if kind == "sample":
        return out, (x - a * out) / b
    if kind == "v_prediction":
        return a * x - b * out, a * out + b * x
    raise ValueError(f"prediction_type {kind!r} must be one of epsilon, sample or v_prediction")


def _ddim_step(
    scheduler: DDIMScheduler, x: torch.Tensor, out: torch.Tensor, i: int, j: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = scheduler.config
    acp = scheduler.alphas_cumprod.to(torch.float32)
    ab_i = acp[int(scheduler.timesteps[i])].to(x.device)
    if j == len(scheduler.timesteps):
        ab_j = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32).to(x.device)
    else:
        ab_j = acp[int(scheduler.timesteps[j])].to(x.device)
    x0, eps = _vp_x0_eps(cfg.prediction_type, x, out, ab_i)
    if cfg.thresholding:
        x0 = scheduler._threshold_sample(x0)
    elif cfg.clip_sample:
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    x_j = ab_j**0.5 * x0 + (1 - ab_j) ** 0.5 * eps
    lam = 0.5 * (torch.log(ab_i) - torch.log(1 - ab_i))
    return x_j, x0, lam.cpu()


def _dpm_alpha_sigma(
    scheduler: DPMSolverMultistepScheduler, sigma: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    if scheduler.config.use_flow_sigmas:
        return 1 - sigma, sigma
    alpha = 1 / (sigma**2 + 1) ** 0.5
    return alpha, sigma * alpha


def _dpm_x0(
    scheduler: DPMSolverMultistepScheduler,
    x: torch.Tensor,
    out: torch.Tensor,
    sigma: torch.Tensor,
) -> torch.Tensor:
    """DPM-Solver++ data prediction, as ``convert_model_output`` computes it."""
    cfg = scheduler.config
    kind = cfg.prediction_type
    alpha_t, sigma_t = _dpm_alpha_sigma(scheduler, sigma)
    if kind == "epsilon":
        if cfg.variance_type in ("learned", "learned_range"):
            out = out[:, :3]
        x0 = (x - sigma_t * out) / alpha_t
    elif kind == "sample":
        x0 = out
    elif kind == "v_prediction":
        x0 = alpha_t * x - sigma_t * out
    elif kind == "flow_prediction":
        x0 = x - sigma * out
    else:
        raise ValueError(
            f"prediction_type {kind!r} must be one of epsilon, sample, v_prediction or "
            "flow_prediction for DPMSolverMultistepScheduler"
        )
    if cfg.thresholding:
        x0 = scheduler._threshold_sample(x0)
    return x0


def _dpm_step(
    scheduler: DPMSolverMultistepScheduler,
    history: SolverHistory,
    x: torch.Tensor,
    out: torch.Tensor,
    i: int,
    j: int,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    cfg = scheduler.config
    n = len(scheduler.timesteps)
    sigmas = scheduler.sigmas.to(torch.float32).cpu()
    sigma_s0, sigma_t = sigmas[i], sigmas[j]
    alpha_s0, sig_s0 = _dpm_alpha_sigma(scheduler, sigma_s0)
    alpha_t, sig_t = _dpm_alpha_sigma(scheduler, sigma_t)
    lambda_s0 = torch.log(alpha_s0) - torch.log(sig_s0)
    lambda_t = torch.log(alpha_t) - torch.log(sig_t)
    h = lambda_t - lambda_s0
    x0 = _dpm_x0(scheduler, x, out, sigma_s0.to(x.device))
    final_first_order = j == n and (
        cfg.euler_at_final
        or cfg.final_sigmas_type == "zero"
        or float(sigma_t) == 0.0
        or (cfg.lower_order_final and n < 15)
    )
    to = x.device
    if cfg.solver_order == 1 or history.empty or final_first_order:
        x_t = (sig_t / sig_s0).to(to) * x - (alpha_t * (torch.exp(-h) - 1.0)).to(to) * x0
        return x_t, x0, lambda_s0
    m0, m1 = x0, history.x0.to(to)
    r0 = (lambda_s0 - history.lam) / h
    d1 = (1.0 / r0).to(to) * (m0 - m1)
    phi = alpha_t * (torch.exp(-h) - 1.0)
    if cfg.solver_type == "midpoint":
        x_t = (sig_t / sig_s0).to(to) * x - phi.to(to) * m0 - (0.5 * phi).to(to) * d1
    else:  # heun
        x_t = (
            (sig_t / sig_s0).to(to) * x
            - phi.to(to) * m0
            + (alpha_t * ((torch.exp(-h) - 1.0) / h + 1.0)).to(to) * d1
        )
    return x_t, x0, lambda_s0


def _flow_step(
    scheduler: FlowMatchEulerDiscreteScheduler, x: torch.Tensor, out: torch.Tensor, i: int, j: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    sigmas = scheduler.sigmas.to(torch.float32).cpu()
    s_i, s_j = sigmas[i], sigmas[j]
    x0 = x - s_i.to(x.device) * out
    x_j = x + (s_j - s_i).to(x.device) * out
    lam = torch.log(1 - s_i) - torch.log(s_i)
    return x_j, x0, lam


def solver_step(
    scheduler: object,
    history: SolverHistory,
    x: torch.Tensor,
    model_output: torch.Tensor,
    i: int,
    j: int,
) -> torch.Tensor:
    """One solver step from grid index ``i`` to grid index ``j``
    (``0 <= i < j <= len(scheduler.timesteps)``).

    ``j == len(timesteps)`` means the end of the schedule (the stock final step: DDIM to
    ``final_alpha_cumprod``, DPM++ to the scheduler's final sigma (0 or sigma_min), flow Euler to
    sigma 0). ``x``, ``model_output``: (B, C, h, w); ``model_output`` is the guided denoiser
    output at ``t_i``, in the scheduler's ``prediction_type``. Returns x at ``t_j``, (B, C, h, w),
    same dtype as ``x``; math in float32 (see the module docstring for each solver and the rule
    for DPM++'s first-order steps). Updates ``history`` (x0 and lambda at ``t_i``).

    For schedulers without variable strides (:func:`variable_stride` False) only ``j == i + 1``
    is allowed: it delegates to ``scheduler.step(model_output, timesteps[i], x).prev_sample``
    (stateful: call it once per grid point, in order); other ``j`` raise ``ValueError`` naming the
    scheduler class. Raises ``ValueError`` too on indices out of range or a ``history`` that was
    not left at a point before ``i``.
    """
    n = len(scheduler.timesteps)
    i, j = int(i), int(j)
    if not 0 <= i < j <= n:
        raise ValueError(
            f"solver step needs 0 <= i < j <= {n} (grid of {type(scheduler).__name__}); "
            f"got i={i}, j={j}"
        )
    if history.index is not None and history.index >= i:
        raise ValueError(
            f"solver history was left at grid index {history.index}, not before i={i}: "
            "use a fresh SolverHistory per episode (copy it when forking)"
        )
    if not variable_stride(scheduler):
        if j != i + 1:
            raise _stride_one_only(scheduler, i, j)
        history.index = i
        return scheduler.step(model_output, scheduler.timesteps[i], x).prev_sample.to(x.dtype)
    xf, out = x.to(torch.float32), model_output.to(torch.float32)
    if isinstance(scheduler, DDIMScheduler):
        x_j, x0, lam = _ddim_step(scheduler, xf, out, i, j)
    elif isinstance(scheduler, DPMSolverMultistepScheduler):
        x_j, x0, lam = _dpm_step(scheduler, history, xf, out, i, j)
    else:
        x_j, x0, lam = _flow_step(scheduler, xf, out, i, j)
    history.x0, history.lam, history.index = x0, lam, i
    return x_j.to(x.dtype)
