"""The transition-kernel KL: closed form against Monte Carlo, its eta -> 0 mean is the sampler's
own step, finite on half-precision inputs; the KL warm-up schedule."""

from __future__ import annotations

import math

import pytest
import torch
from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

from addiffusion.diffusion.backbone import noise_space
from addiffusion.diffusion.solvers import SolverHistory, solver_step
from addiffusion.distill import losses as L


def _ddim(prediction_type: str = "v_prediction") -> DDIMScheduler:
    s = DDIMScheduler(
        beta_schedule="scaled_linear",
        beta_start=0.00085,
        beta_end=0.012,
        prediction_type=prediction_type,
        timestep_spacing="trailing",
        set_alpha_to_one=False,
    )
    s.set_timesteps(4)
    return s


def _flow() -> FlowMatchEulerDiscreteScheduler:
    s = FlowMatchEulerDiscreteScheduler(shift=3.0)
    s.set_timesteps(4)
    return s


def test_gaussian_kl_closed_form_matches_monte_carlo() -> None:
    g = torch.Generator().manual_seed(0)
    mu_p, mu_q = torch.tensor([0.3, -1.0, 2.0]), torch.tensor([0.0, -0.5, 1.0])
    var_p, var_q = torch.tensor([0.5, 1.0, 0.2]), torch.tensor([0.8, 0.3, 0.25])
    closed = L.gaussian_kl(mu_p, var_p, mu_q, var_q)
    x = mu_p + var_p.sqrt() * torch.randn(400_000, 3, generator=g, dtype=torch.float64)

    def log_normal(x: torch.Tensor, mu: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        return -0.5 * (torch.log(2 * math.pi * var) + (x - mu) ** 2 / var)

    mc = (log_normal(x, mu_p, var_p) - log_normal(x, mu_q, var_q)).mean(0)
    assert torch.allclose(closed.double(), mc, atol=0.01), (closed, mc)
    assert (closed >= 0).all()
    assert L.gaussian_kl(mu_p, var_p, mu_p, var_p).abs().max() < 1e-6


@pytest.mark.parametrize("kind", ["ddim-v", "ddim-eps", "flow"])
def test_kernel_kl_against_monte_carlo_of_the_sampled_transition(kind: str) -> None:
    """The KL of two kernels is what sampling x_s from the student's kernel and scoring it under
    both kernels estimates."""
    sched = (
        _flow() if kind == "flow" else _ddim("epsilon" if kind == "ddim-eps" else "v_prediction")
    )
    space = noise_space(sched)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(1, 4, 2, 2, generator=g)
    out_t = torch.randn(1, 4, 2, 2, generator=g)
    out_s = out_t + 0.3 * torch.randn(1, 4, 2, 2, generator=g)
    i = 1
    mu_t, var = L.transition_kernel(sched, space, i, x, out_t, 1.0, 1e-4)
    mu_s, var_s = L.transition_kernel(sched, space, i, x, out_s, 1.0, 1e-4)
    assert float(var) == float(var_s) > 1e-4
    closed = L.gaussian_kl(mu_s, var_s, mu_t, var).mean()
    xs = mu_s + var_s.sqrt() * torch.randn(200_000, 4, 2, 2, generator=g)
    log_ratio = (-((xs - mu_s) ** 2) / (2 * var_s) + (xs - mu_t) ** 2 / (2 * var)).mean(0).mean()
    assert abs(float(closed) - float(log_ratio)) < 0.02 * max(1.0, float(closed))


@pytest.mark.parametrize("kind", ["ddim", "flow"])
def test_eta_zero_kernel_mean_is_the_samplers_step(kind: str) -> None:
    sched = _flow() if kind == "flow" else _ddim()
    space = noise_space(sched)
    g = torch.Generator().manual_seed(2)
    x, out = torch.randn(2, 4, 3, 3, generator=g), torch.randn(2, 4, 3, 3, generator=g)
    for i in range(3):
        mean, _ = L.transition_kernel(sched, space, i, x, out, 0.0, 1e-3)
        step = solver_step(sched, SolverHistory(), x, out, i, i + 1)
        assert torch.allclose(mean, step, atol=1e-5), i


def test_ddpm_posterior_variance_at_eta_one() -> None:
    """eta = 1 gives the DDPM posterior variance (1 - ab_s) / (1 - ab_t) * (1 - ab_t / ab_s)."""
    sched = _ddim()
    acp = sched.alphas_cumprod
    t, s = int(sched.timesteps[1]), int(sched.timesteps[2])
    want = (1 - acp[s]) / (1 - acp[t]) * (1 - acp[t] / acp[s])
    _, var = L.transition_kernel(
        sched, "vp", 1, torch.zeros(1, 1, 1, 1), torch.zeros(1, 1, 1, 1), 1.0, 1e-9
    )
    assert torch.allclose(var, want.float(), rtol=1e-4)


def test_final_flow_step_uses_the_floor() -> None:
    sched = _flow()
    _, var = L.transition_kernel(
        sched, "flow", 3, torch.ones(1, 1, 1, 1), torch.ones(1, 1, 1, 1), 1.0, 0.01
    )
    assert float(var) == pytest.approx(0.01)


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_losses_are_finite_on_half_precision(dtype: torch.dtype) -> None:
    sched = _ddim()
    g = torch.Generator().manual_seed(3)
    states = [torch.randn(2, 4, 8, 8, generator=g).to(dtype) for _ in range(4)]
    teacher = [(3 * torch.randn(2, 4, 8, 8, generator=g)).to(dtype) for _ in range(4)]
    student = [
        (3 * torch.randn(2, 4, 8, 8, generator=g)).to(dtype).requires_grad_() for _ in range(4)
    ]
    parts = L.distill_losses(sched, "vp", states, teacher, student, 1.0, 1e-3)
    total = parts.total(1.0, 1.0)
    assert total.dtype == torch.float32 and torch.isfinite(total)
    assert torch.isfinite(parts.kl_per_step).all() and parts.kl_per_step.shape == (4,)
    total.backward()
    assert all(torch.isfinite(s.grad.float()).all() for s in student)


def test_misaligned_lists_are_an_error() -> None:
    sched = _ddim()
    x = [torch.zeros(1, 4, 2, 2)] * 4
    with pytest.raises(ValueError, match="aligned"):
        L.distill_losses(sched, "vp", x, x[:3], x, 1.0, 1e-3)
    with pytest.raises(ValueError, match="shapes differ"):
        L.distill_losses(sched, "vp", x, [torch.zeros(2, 4, 2, 2)] * 4, x, 1.0, 1e-3)


def test_kl_weight_warms_up_after_the_mse_phase() -> None:
    w = [L.kl_weight_at(s, 2.0, 3, 4) for s in range(9)]
    assert w[:3] == [0.0, 0.0, 0.0]
    assert w[3:8] == [0.5, 1.0, 1.5, 2.0, 2.0]
    assert L.kl_weight_at(0, 1.0, 0, 0) == 1.0
