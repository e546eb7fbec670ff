"""Metrics, paired bootstrap and heuristic policies on synthetic numbers (no models)."""

from __future__ import annotations

import numpy as np
import pytest

from addiffusion.diffusion import mdp
from addiffusion.diffusion.actions import ActionTable
from addiffusion.eval.metrics import closest_baseline, compare, paired_bootstrap, summarize
from addiffusion.eval.policies import ClipDeltaStop, StabilityStop, StopAtStep
from addiffusion.eval.rollout import legal_or_fallback


def _obs(clip_delta: list[float], stability: list[float], nfe: list[int], n_max: int) -> np.ndarray:
    n = len(nfe)
    return mdp.build_observations(
        image_features=np.zeros((n, 4)),
        text_features=np.zeros((n, 4)),
        t_frac=np.zeros(n),
        step=np.array(nfe) - 1,
        n_max=n_max,
        clip_score=np.zeros(n),
        clip_score_delta=np.array(clip_delta),
        stability=np.array(stability),
        nfe=np.array(nfe),
        refines_used=np.zeros(n),
    )


def test_heuristics_read_the_observation_and_respect_masks() -> None:
    obs = _obs([0.5, 0.0, 0.0, 0.5], [0.99, 0.5, 0.99, 0.2], [2, 2, 1, 4], n_max=4)
    t = ActionTable.build([1, 2], n_max=4, warmup=1, refine_budget=0, refine_k=2)
    mask = t.mask(np.array([1, 1, 0, 3]), 0)
    s, j = t.stop, t.jump(1)
    # Row 2 is in warm-up (stop illegal), row 3 at the last point (only stop legal).
    assert StabilityStop(0.95, t).act(obs, mask).tolist() == [s, j, j, s]
    assert ClipDeltaStop(0.1, t).act(obs, mask).tolist() == [j, s, j, s]
    assert StopAtStep(1, t).act(obs, mask).tolist() == [s, s, j, s]


def test_illegal_actions_are_replaced_and_counted() -> None:
    # One stride: ids jump-1 0, stop 1, refine 2.
    t = ActionTable.build([1], n_max=4, warmup=1, refine_budget=0, refine_k=2)
    mask = np.array([[True, False, False], [False, True, False], [True, True, False]])
    actions, n_bad = legal_or_fallback(np.array([1, 0, 2]), mask, t)
    assert actions.tolist() == [0, 1, 0] and n_bad == 3
    actions, n_bad = legal_or_fallback(np.array([0, 1, 1]), mask, t)
    assert actions.tolist() == [0, 1, 1] and n_bad == 0


def test_summary_per_category_and_verifier_accuracy() -> None:
    s = summarize(
        np.array([2, 4, 6, 8]),
        {"clip_score": np.array([0.1, 0.2, 0.3, 0.4]), "verifier": np.array([1.0, 0.5, 1.0, 0.0])},
        ["a", "a", "b", "b"],
    )
    assert s["nfe"] == 5.0 and s["nfe_std"] == pytest.approx(np.sqrt(5.0))
    assert s["verifier_acc"] == 0.5
    assert s["by_category"]["a"] == {
        "n": 2,
        "nfe": 3.0,
        "clip_score": pytest.approx(0.15),
        "verifier": 0.75,
        "verifier_acc": 0.5,
    }


def test_bootstrap_interval_covers_a_shift_and_detects_it() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(40), 2)
    base = rng.normal(size=80)
    shifted = paired_bootstrap(base + 0.3 + rng.normal(0, 0.1, 80), base, groups, 2000, 0.95, rng)
    assert shifted["ci_low"] < 0.3 < shifted["ci_high"] and shifted["p"] < 0.01
    same = paired_bootstrap(base + rng.normal(0, 0.1, 80), base, groups, 2000, 0.95, rng)
    assert same["ci_low"] < 0.0 < same["ci_high"] and same["p"] > 0.05


def test_bootstrap_resamples_prompts_not_images() -> None:
    # Two prompts whose seeds agree perfectly: image-level resampling would claim certainty,
    # the prompt-cluster bootstrap sees only two independent units.
    a = np.array([1.0] * 50 + [-0.5] * 50)
    r = paired_bootstrap(
        a, np.zeros(100), np.repeat([0, 1], 50), 2000, 0.95, np.random.default_rng(0)
    )
    assert r["ci_low"] == pytest.approx(-0.5) and r["ci_high"] == pytest.approx(1.0)


def test_closest_baseline_and_compare_keys() -> None:
    base = {"ddim-2": 2.0, "ddim-4": 4.0, "ddim-8": 8.0}
    assert closest_baseline(2.9, base) == "ddim-2"
    assert closest_baseline(3.0, base) == "ddim-4"  # tie: the stronger reference
    assert closest_baseline(100.0, base) == "ddim-8"
    with pytest.raises(ValueError, match="no fixed-step baselines"):
        closest_baseline(1.0, {})
    out = compare(
        {"nfe": np.array([3, 3]), "clip_score": np.array([0.2, 0.4])},
        {"nfe": np.array([4, 4]), "clip_score": np.array([0.1, 0.1])},
        np.array([0, 1]),
        100,
        0.9,
        seed=0,
    )
    assert out["nfe_diff"] == -1.0 and out["clip_score_diff"] == pytest.approx(0.2)
    assert set(out) == {
        "nfe_diff",
        "clip_score_diff",
        "clip_score_ci_low",
        "clip_score_ci_high",
        "clip_score_p",
    }
