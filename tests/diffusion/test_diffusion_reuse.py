"""The reuse action (0 NFE): a solver step with the last denoiser output, no evaluation."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from addiffusion.diffusion.actions import ActionTable
from addiffusion.diffusion.backbone import load_pipeline
from addiffusion.diffusion.sampler import SamplerSettings, StepwiseSampler
from addiffusion.eval.policies import AdaptiveDiffusionSkip
from addiffusion.eval.rollout import run_method
from addiffusion.rewards.clip import ClipScorer

SETTINGS = SamplerSettings(n_max=6, warmup=1, guidance_scale=4.0, height=32, width=32, reuse=True)


@pytest.fixture(scope="module")
def sampler(tiny_pipe_dir: Path, tiny_clip: ClipScorer) -> StepwiseSampler:
    return StepwiseSampler(load_pipeline(str(tiny_pipe_dir), "ddim", "cpu"), tiny_clip, SETTINGS)


def test_table_offers_reuse_after_warmup_and_round_trips(sampler: StepwiseSampler) -> None:
    t = sampler.table
    assert t.names[-1] == "reuse" and t.nfe_cost[t.reuse] == 0
    mask = t.mask(np.arange(6))
    assert mask[:, t.reuse].tolist() == [False, True, True, True, True, False]
    assert ActionTable.from_dict(t.to_dict()) == t
    assert not ActionTable.build([1], 6, 1, 0, 2).has_reuse


def test_reuse_steps_with_the_stale_output_and_costs_nothing(sampler: StepwiseSampler) -> None:
    eps, _ = sampler.start(["a red circle", "two blue squares"], [1, 2])
    t = sampler.table
    sampler.apply(eps, [t.jump(1)] * 2)  # point 1, 2 NFE
    stale = [ep.model_output.clone() for ep in eps]
    before = [ep.latents.clone() for ep in eps]
    scheduler = [ep.scheduler for ep in eps]
    # Episode 0 reuses, episode 1 evaluates: one batch, two kinds.
    out = sampler.apply(eps, [t.reuse, t.jump(1)])
    assert out.moved == [0, 1] and [ep.step for ep in eps] == [2, 2]
    assert [ep.nfe for ep in eps] == [2, 3]
    torch.testing.assert_close(eps[0].model_output, stale[0])
    assert not torch.equal(eps[1].model_output, stale[1])
    # DDIM from t_1 to t_2 with the stale ε, by hand.
    a = scheduler[0].alphas_cumprod
    t1, t2 = (int(scheduler[0].timesteps[i]) for i in (1, 2))
    eps_hat = stale[0].float()
    x0 = (before[0].float() - (1 - a[t1]).sqrt() * eps_hat) / a[t1].sqrt()
    want = a[t2].sqrt() * x0 + (1 - a[t2]).sqrt() * eps_hat
    torch.testing.assert_close(eps[0].latents.float(), want, atol=1e-5, rtol=1e-5)
    # x̂0 at the new point is predicted from the stale output there.
    x0_new = (want - (1 - a[t2]).sqrt() * eps_hat) / a[t2].sqrt()
    torch.testing.assert_close(eps[0].x0.float(), x0_new, atol=1e-5, rtol=1e-5)


def test_adaptive_diffusion_rule_skips_only_when_allowed(sampler: StepwiseSampler) -> None:
    prompts, seeds = ["a red circle", "three blue squares"], [5, 6]
    never = run_method(sampler, AdaptiveDiffusionSkip(0.0, 4, sampler.table), prompts, seeds, 2)
    assert never.nfe.tolist() == [6, 6]  # threshold 0: the full grid
    loose = run_method(sampler, AdaptiveDiffusionSkip(1e9, 1, sampler.table), prompts, seeds, 2)
    # Three latent differences are needed first (points 0-3 evaluated), then reuse at point 3
    # lands on 4 without a call; the cap of 1 forces the evaluation at 5: 5 NFE.
    assert loose.nfe.tolist() == [5, 5]
    capped = run_method(sampler, AdaptiveDiffusionSkip(1e9, 4, sampler.table), prompts, seeds, 2)
    assert capped.nfe.tolist() == [4, 4]  # reuse at 3 and 4: no evaluation after point 3
