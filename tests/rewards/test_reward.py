from __future__ import annotations

import numpy as np
import pytest

from addiffusion.rewards.config import RewardConfig
from addiffusion.rewards.reward import component_stats, quality, step_reward, stop_reward


def test_return_telescopes_to_final_quality_minus_nfe_cost() -> None:
    rng = np.random.default_rng(0)
    comps = {"clip_score": rng.normal(size=8), "stability": rng.normal(size=8)}
    cfg = RewardConfig(weights={"clip_score": 1.0, "stability": 0.5}, c_nfe=0.1, terminal_bonus=2.0)
    q = quality(comps, cfg, component_stats(comps))
    j = 5  # stop at step j after j continues
    ret = step_reward(q[:j], q[1 : j + 1], np.ones(j), cfg).sum() + stop_reward(q[j], cfg)
    assert ret == pytest.approx(q[j] - q[0] - 0.1 * j + 2.0 * q[j], rel=1e-5)


def test_normalisation_uses_stats() -> None:
    comps = {"clip_score": np.array([1.0, 3.0])}
    stats = component_stats(comps)
    assert stats["clip_score"] == {"mean": 2.0, "std": 1.0}
    q = quality(comps, RewardConfig(weights={"clip_score": 1.0}), stats)
    np.testing.assert_allclose(q, [-1.0, 1.0])


def test_missing_component_is_named() -> None:
    with pytest.raises(KeyError, match="'verifier'.*available: clip_score"):
        quality(
            {"clip_score": np.zeros(2)}, RewardConfig(weights={"verifier": 1.0}, normalize=False)
        )
