"""Distillation losses: a per-timestep KL between the teacher's and the student's Gaussian
transition kernels, a prediction MSE auxiliary, and final latent / image MSEs for monitoring.

The transition kernel
---------------------
Both samplers the project distils are the deterministic (eta = 0) member of the DDIM family on
marginals ``x_t = alpha_t x0 + sigma_t eps``: VP DDIM (``alpha_t^2 = alphas_cumprod[t]``,
``sigma_t^2 = 1 - alpha_t^2``) and rectified-flow Euler (SD3: ``alpha_t = 1 - s_t``,
``sigma_t = s_t``; with eta = 0 the DDIM update below *is* the Euler step
``x + (s_next - s) v``). A deterministic step has no density, so the KL is defined on the DDIM
family's stochastic member (Song et al. 2021, eq. 12, written for any ``alpha, sigma``): from
grid point ``i`` (time t) to ``i + 1`` (time s), with the model's x0 and eps predictions at x_t,

    p(x_s | x_t) = N(mu, c^2 I),
    c^2 = eta^2 sigma_s^2 (1 - (alpha_t sigma_s)^2 / (alpha_s sigma_t)^2),
    mu  = alpha_s x0_hat + sqrt(sigma_s^2 - c^2) eps_hat.

With eta = 1 this is the DDPM posterior q(x_s | x_t, x0 = x0_hat) (for VP and for flow
marginals alike); eta -> 0 recovers the sampler's own step as the mean. Teacher and student share
t, s and eta, so their kernels share c^2 and differ in mu only. The final step to noise level 0
(flow, or DDIM with ``set_alpha_to_one``) has c^2 = 0 under any eta: ``var_floor`` floors c^2
(and is applied everywhere, so the loss is well defined at every step; the floored KL of such a
step is ``|mu_s - mu_t|^2 / (2 var_floor)``, a scaled x0 MSE).

The closed form of two diagonal Gaussians (per element, summed to the mean over elements),

    KL(N(m1, v1) || N(m2, v2)) = 1/2 (log(v2 / v1) + (v1 + (m1 - m2)^2) / v2 - 1),

is taken in the reverse direction KL(student || teacher), as on-policy distillation does (the
states are the student's samples; Agarwal et al. 2024, "On-Policy Distillation of Language
Models"); with equal variances it is symmetric anyway. All of it runs in float32, whatever the
dtype of the predictions (fp16 / bf16 under mixed precision).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from addiffusion.diffusion import backbone
from addiffusion.diffusion.backbone import NoiseSpace


def marginal(scheduler: object, space: NoiseSpace, i: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(alpha, sigma)`` of grid point ``i`` (``i == len(timesteps)``: the end of the schedule),
    0-dim float32: ``x_i = alpha x0 + sigma eps``."""
    n = len(scheduler.timesteps)
    if space == "flow":
        s = scheduler.sigmas[i].detach().cpu().float()
        return 1.0 - s, s
    if space != "vp":
        raise ValueError(
            f"the transition kernel needs a VP (DDIM) or flow-matching scheduler, got "
            f"{type(scheduler).__name__} (noise space {space!r})"
        )
    if i < n:
        ab = scheduler.alphas_cumprod[int(scheduler.timesteps[i])].float()
    else:
        ab = torch.as_tensor(scheduler.final_alpha_cumprod, dtype=torch.float32)
    return ab.sqrt(), (1.0 - ab).sqrt()


def transition_kernel(
    scheduler: object,
    space: NoiseSpace,
    i: int,
    x: torch.Tensor,
    model_output: torch.Tensor,
    eta: float,
    var_floor: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean (B, C, h, w) and variance (0-dim) of the Gaussian kernel p(x_{i+1} | x_i) of a
    model output at ``x`` (module docstring), float32. x̂0 is clipped / thresholded as the
    sampler's DDIM step does (eps from the unclipped output), so at eta = 0 the mean is exactly
    :func:`addiffusion.diffusion.solvers.solver_step`."""
    a_t, s_t = (v.to(x.device) for v in marginal(scheduler, space, i))
    a_s, s_s = (v.to(x.device) for v in marginal(scheduler, space, i + 1))
    x = x.float()
    x0 = backbone.predict_x0(scheduler, i, space, x, model_output.float())
    eps = (x - a_t * x0) / s_t
    cfg = scheduler.config
    if space == "vp" and cfg.get("thresholding", False):  # as the sampler's DDIM step
        x0 = scheduler._threshold_sample(x0)
    elif space == "vp" and cfg.get("clip_sample", False):
        x0 = x0.clamp(-cfg.clip_sample_range, cfg.clip_sample_range)
    c2 = (eta**2 * s_s**2 * (1.0 - (a_t * s_s) ** 2 / (a_s * s_t) ** 2)).clamp(min=0.0)
    mean = a_s * x0 + (s_s**2 - c2).clamp(min=0.0).sqrt() * eps
    return mean, c2.clamp(min=var_floor)


def gaussian_kl(
    mu_p: torch.Tensor, var_p: torch.Tensor, mu_q: torch.Tensor, var_q: torch.Tensor
) -> torch.Tensor:
    """Elementwise KL(N(mu_p, var_p) || N(mu_q, var_q)) in nats, float32 (broadcasting)."""
    mu_p, mu_q = mu_p.float(), mu_q.float()
    var_p, var_q = torch.as_tensor(var_p).float(), torch.as_tensor(var_q).float()
    return 0.5 * (torch.log(var_q / var_p) + (var_p + (mu_p - mu_q) ** 2) / var_q - 1.0)


@dataclass(frozen=True)
class Losses:
    """Loss components of one batch (0-dim float32 tensors; ``kl_per_step``: (n_steps,))."""

    kl: torch.Tensor
    """Mean over timesteps of the per-element mean KL(student || teacher) kernel, nats."""
    mse: torch.Tensor
    """Mean over timesteps of the prediction MSE (eps / v / flow: the scheduler's type)."""
    kl_per_step: torch.Tensor

    def total(self, kl_weight: float, mse_weight: float) -> torch.Tensor:
        return kl_weight * self.kl + mse_weight * self.mse


def distill_losses(
    scheduler: object,
    space: NoiseSpace,
    states: list[torch.Tensor],
    teacher: list[torch.Tensor],
    student: list[torch.Tensor],
    eta: float,
    var_floor: float,
    indices: list[int] | None = None,
) -> Losses:
    """KL and MSE over aligned lists (one entry per timestep: x_t (B, C, h, w), the teacher's and
    the student's predictions there). ``indices``: the grid index of each entry (default
    0..n-1). Lists of different lengths raise ``ValueError`` (no broadcast)."""
    n = len(states)
    if not (n == len(teacher) == len(student)) or n == 0:
        raise ValueError(
            f"aligned lists needed: {n} states, {len(teacher)} teacher and {len(student)} student "
            "predictions"
        )
    indices = list(range(n)) if indices is None else indices
    kls, mses = [], []
    for k, i in enumerate(indices):
        if teacher[k].shape != student[k].shape or states[k].shape != student[k].shape:
            raise ValueError(
                f"step {i}: shapes differ (state {tuple(states[k].shape)}, teacher "
                f"{tuple(teacher[k].shape)}, student {tuple(student[k].shape)})"
            )
        mu_t, var = transition_kernel(
            scheduler, space, i, states[k], teacher[k].detach(), eta, var_floor
        )
        mu_s, _ = transition_kernel(scheduler, space, i, states[k], student[k], eta, var_floor)
        kls.append(gaussian_kl(mu_s, var, mu_t, var).mean())
        mses.append((student[k].float() - teacher[k].detach().float()).pow(2).mean())
    kl_per_step = torch.stack(kls)
    return Losses(kl_per_step.mean(), torch.stack(mses).mean(), kl_per_step)


def kl_weight_at(step: int, weight: float, start: int, ramp: int) -> float:
    """KL weight at optimizer step ``step`` (0-based): 0 for the first ``start`` steps (the MSE
    auxiliary alone), then rising linearly to ``weight`` over ``ramp`` steps."""
    if step < start:
        return 0.0
    if ramp == 0:
        return weight
    return weight * min(1.0, (step - start + 1) / ramp)


def mse(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean squared difference of two same-shape tensors, float32 (monitoring: final latents,
    images in [0, 1])."""
    if a.shape != b.shape:
        raise ValueError(f"shapes differ: {tuple(a.shape)} vs {tuple(b.shape)}")
    return float((a.float() - b.float()).pow(2).mean())
