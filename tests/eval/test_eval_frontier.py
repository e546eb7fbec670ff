"""Fixed-schedule frontier, hindsight oracle and frontier comparison on synthetic numbers."""

from __future__ import annotations

import math
import re
from pathlib import Path

import numpy as np
import pytest

from addiffusion.eval.frontier import (
    FixedRun,
    FrontierComparison,
    best_learned,
    cheapest_fixed_nfe,
    compare_to_frontier,
    fixed_frontier,
    frontier_items,
    headroom,
    heldout_seed_curve,
    oracle_curve,
    oracle_items,
    oracle_nfe_at,
    plot_frontier,
)

N_PROMPTS, N_SEEDS = 20, 4
N = N_PROMPTS * N_SEEDS


def _const(x: float, n: int = N) -> np.ndarray:
    return np.full(n, x)


def _mixed_runs() -> list[FixedRun]:
    """Two solvers; dpm-4 beats ddim-8, ddim-6 is dominated by ddim-4 (cheaper, better)."""
    return [
        FixedRun("ddim-2", "ddim", 2, _const(0.2)),
        FixedRun("ddim-4", "ddim", 4, _const(0.5)),
        FixedRun("ddim-6", "ddim", 6, _const(0.4)),
        FixedRun("ddim-8", "ddim", 8, _const(0.6)),
        FixedRun("dpm-3", "dpmsolver++", 3, _const(0.45)),
        FixedRun("dpm-4", "dpmsolver++", 4, _const(0.7)),
    ]


def _easy_hard() -> tuple[list[FixedRun], np.ndarray, np.ndarray, np.ndarray]:
    """Half the items are easy (k=2 already at the max), half hard (need k=8).

    Easy items 0.9 at every k; hard items 0.2 / 0.4 / 0.9 at k = 2 / 4 / 8, plus small noise that
    keeps each item's max at k=8 (hard) and equal across k (easy). Each prompt has 2 easy and 2
    hard seeds. Means: k2 0.55, k4 0.65, k8 0.9.
    """
    rng = np.random.default_rng(1)
    prompt_ids = np.repeat(np.arange(N_PROMPTS), N_SEEDS)
    easy = np.tile([True, True, False, False], N_PROMPTS)
    top = 0.9 + rng.uniform(-0.02, 0.02, N)
    s2 = np.where(easy, top, 0.2 + rng.uniform(-0.02, 0.02, N))
    s4 = np.where(easy, top, 0.4 + rng.uniform(-0.02, 0.02, N))
    s8 = top.copy()
    runs = [
        FixedRun("ddim-2", "ddim", 2, s2),
        FixedRun("ddim-4", "ddim", 4, s4),
        FixedRun("ddim-8", "ddim", 8, s8),
    ]
    return runs, prompt_ids, easy, top


# ----------------------------------------------------------------------------- frontier


def test_frontier_all_solvers_is_monotone_and_names_the_achiever() -> None:
    front = fixed_frontier(_mixed_runs())
    assert [p.nfe for p in front] == [2, 3, 4, 6, 8]
    assert [p.score for p in front] == pytest.approx([0.2, 0.45, 0.7, 0.7, 0.7])
    assert [p.name for p in front] == ["ddim-2", "dpm-3", "dpm-4", "dpm-4", "dpm-4"]
    assert all(b.score >= a.score for a, b in zip(front, front[1:], strict=False))


def test_frontier_per_solver_and_dominated_schedule_never_appears() -> None:
    ddim = fixed_frontier(_mixed_runs(), "ddim")
    assert [p.nfe for p in ddim] == [2, 4, 6, 8]
    assert [p.score for p in ddim] == pytest.approx([0.2, 0.5, 0.5, 0.6])
    assert [p.name for p in ddim] == ["ddim-2", "ddim-4", "ddim-4", "ddim-8"]
    dpm = fixed_frontier(_mixed_runs(), "dpmsolver++")
    assert [(p.nfe, p.name) for p in dpm] == [(3, "dpm-3"), (4, "dpm-4")]
    for front in (ddim, dpm, fixed_frontier(_mixed_runs())):
        assert "ddim-6" not in {p.name for p in front}
    with pytest.raises(ValueError, match="no fixed runs of solver 'euler'"):
        fixed_frontier(_mixed_runs(), "euler")


def test_frontier_items_exact_at_points_and_midpoint() -> None:
    runs = [
        FixedRun("ddim-4", "ddim", 4, np.array([0.0, 0.4, 1.0])),
        FixedRun("ddim-8", "ddim", 8, np.array([1.0, 0.8, 1.0])),
    ]
    items, label = frontier_items(runs, 4.0)
    np.testing.assert_allclose(items, [0.0, 0.4, 1.0])
    assert label == "ddim-4"
    items, label = frontier_items(runs, 6.0)
    np.testing.assert_allclose(items, [0.5, 0.6, 1.0])
    assert label == "ddim-4..ddim-8 (w=0.50)"
    items, label = frontier_items(runs, 5.0)
    np.testing.assert_allclose(items, [0.25, 0.5, 1.0])
    assert label == "ddim-4..ddim-8 (w=0.25)"
    items, label = frontier_items(runs, 2.0)
    np.testing.assert_allclose(items, [0.0, 0.4, 1.0])
    assert "below cheapest" in label
    items, label = frontier_items(runs, 20.0)
    np.testing.assert_allclose(items, [1.0, 0.8, 1.0])
    assert "above most expensive" in label and label.startswith("ddim-8")


def test_frontier_items_flat_segment_uses_the_cheaper_achiever() -> None:
    items, label = frontier_items(_mixed_runs(), 7.0)  # between 6 and 8, both dpm-4
    np.testing.assert_allclose(items, 0.7)
    assert label == "dpm-4"


# ----------------------------------------------------------------------------- oracle


def test_oracle_easy_hard() -> None:
    runs, _, easy, top = _easy_hard()
    nfe, score = oracle_items(runs)
    np.testing.assert_array_equal(nfe, np.where(easy, 2.0, 8.0))
    np.testing.assert_allclose(score, top)
    assert nfe.mean() == pytest.approx(5.0)
    per_item_max = np.max(np.stack([r.scores for r in runs]), axis=0)
    assert score.mean() == pytest.approx(per_item_max.mean())

    curve = oracle_curve(runs)
    assert curve[-1] == pytest.approx((5.0, per_item_max.mean()))
    assert curve[0] == pytest.approx((2.0, float(runs[0].scores.mean())))
    xs, ys = np.array(curve).T
    assert np.all(np.diff(xs) > 0) and np.all(np.diff(ys) > 0)
    # The oracle curve dominates every fixed schedule.
    for r in runs:
        assert oracle_nfe_at(curve, float(r.scores.mean())) <= r.k + 1e-9
    # Few lambdas: still ends at the oracle point.
    assert oracle_curve(runs, n_lambdas=3)[-1] == pytest.approx(curve[-1])


def test_grouped_oracle_separates_what_the_chooser_knows() -> None:
    """Easy and hard seeds share every prompt: knowing the prompt is worth nothing, knowing the
    type (or the item) is worth the whole gap between the frontier and the oracle."""
    runs, prompt_ids, easy, top = _easy_hard()
    by_prompt = oracle_curve(runs, groups=prompt_ids)
    room = headroom(by_prompt, runs)
    assert abs(room.max_gain) < 0.03  # only the ±0.02 per-item noise can be picked
    by_type = oracle_curve(runs, groups=np.where(easy, "easy", "hard"))
    assert by_type[-1] == pytest.approx((5.0, top.mean()), abs=0.01)
    room = headroom(by_type, runs)
    # At 5 NFE the frontier mixes ddim-4 and ddim-8 (w=0.25): 0.75 * 0.65 + 0.25 * 0.9.
    assert room.nfe == pytest.approx(5.0)
    assert room.max_gain == pytest.approx(0.9 - (0.75 * 0.65 + 0.25 * 0.9), abs=0.01)
    # Every item its own group is the per-item oracle.
    np.testing.assert_allclose(oracle_curve(runs, groups=np.arange(N)), oracle_curve(runs))
    with pytest.raises(ValueError, match=r"groups has shape \(3,\)"):
        oracle_curve(runs, groups=np.arange(3))


def test_heldout_seed_curve_keeps_real_structure_and_drops_luck() -> None:
    # Real structure: easy/hard is a property of the group, the same on every seed.
    runs, _, easy, top = _easy_hard()
    folds = np.tile(np.arange(N_SEEDS), N_PROMPTS)
    kind = np.where(easy, "easy", "hard")
    held = headroom(heldout_seed_curve(runs, kind, folds), runs)
    assert held.max_gain == pytest.approx(
        headroom(oracle_curve(runs, groups=kind), runs).max_gain, abs=0.02
    )
    assert held.max_gain > 0.15
    # Luck only: every item's score at every k is an independent coin with a mean rising in k.
    rng = np.random.default_rng(0)
    prompts = np.repeat(np.arange(200), 2)
    luck = [
        FixedRun(f"ddim-{k}", "ddim", k, (rng.random(400) < p).astype(float))
        for k, p in ((1, 0.2), (2, 0.4), (3, 0.55), (4, 0.65), (6, 0.72), (8, 0.75))
    ]
    seed_idx = np.tile([0, 1], 200)
    in_sample = headroom(oracle_curve(luck, groups=prompts), luck).max_gain
    honest = headroom(heldout_seed_curve(luck, prompts, seed_idx), luck).max_gain
    assert in_sample > 0.1 and honest < 0.05
    with pytest.raises(ValueError, match="at least 2 folds"):
        heldout_seed_curve(luck, prompts, np.zeros(400))
    with pytest.raises(ValueError, match=r"folds has shape \(3,\)"):
        heldout_seed_curve(luck, prompts, np.zeros(3))


def test_oracle_nfe_at_interpolates_and_cheapest_fixed() -> None:
    curve = [(2.0, 0.5), (4.0, 0.7), (5.0, 0.9)]
    assert oracle_nfe_at(curve, 0.6) == pytest.approx(3.0)
    assert oracle_nfe_at(curve, 0.9) == pytest.approx(5.0)
    assert oracle_nfe_at(curve, 0.1) == pytest.approx(2.0)
    assert math.isnan(oracle_nfe_at(curve, 0.95))
    runs = _mixed_runs()
    assert cheapest_fixed_nfe(runs, 0.45) == 3.0
    assert cheapest_fixed_nfe(runs, 0.55) == 4.0
    assert math.isnan(cheapest_fixed_nfe(runs, 0.8))


def test_oracle_ties_pick_the_cheaper_schedule() -> None:
    runs = [
        FixedRun("a-2", "a", 2, np.array([0.5, 0.1])),
        FixedRun("b-4", "b", 4, np.array([0.5, 0.3])),
    ]
    nfe, score = oracle_items(runs)
    np.testing.assert_array_equal(nfe, [2.0, 4.0])
    np.testing.assert_allclose(score, [0.5, 0.3])
    assert np.array(oracle_curve(runs)) == pytest.approx(np.array([(2.0, 0.3), (3.0, 0.4)]))


# ----------------------------------------------------------------------------- comparison


def test_policy_using_the_right_schedule_per_item_beats_the_frontier() -> None:
    runs, prompt_ids, easy, _ = _easy_hard()
    nfe = np.where(easy, 2.0, 8.0)
    scores = np.where(easy, runs[0].scores, runs[2].scores)
    c = compare_to_frontier("policy", nfe, scores, runs, prompt_ids, n_boot=500)
    assert c.nfe == pytest.approx(5.0)
    frontier = 0.75 * runs[1].scores.mean() + 0.25 * runs[2].scores.mean()
    assert c.frontier == pytest.approx(frontier)
    assert c.frontier_label == "ddim-4..ddim-8 (w=0.25)"
    assert c.gain == pytest.approx(scores.mean() - frontier)
    assert c.gain > 0.1 and c.ci[0] > 0.0 and c.ci[0] <= c.gain <= c.ci[1]
    assert c.nfe_ratio == pytest.approx(5.0 / 8.0)
    assert c.oracle_ratio == pytest.approx(1.0)


def test_policy_equal_to_a_fixed_run_has_no_gain() -> None:
    runs, prompt_ids, _, _ = _easy_hard()
    c = compare_to_frontier("copy", _const(4.0), runs[1].scores, runs, prompt_ids, n_boot=200)
    assert c.gain == pytest.approx(0.0, abs=1e-12)
    assert c.ci[0] <= 0.0 <= c.ci[1]
    assert c.nfe_ratio == pytest.approx(1.0)
    # The oracle reaches k=4's mean with fewer NFE (hard items straight to k=8): ~4 / 2.86.
    assert c.oracle_ratio == pytest.approx(4.0 / (2.0 + 0.1 * 6.0 / 0.7), rel=0.05)


def test_noisy_policy_at_frontier_has_ci_containing_zero() -> None:
    runs, prompt_ids, _, _ = _easy_hard()
    rng = np.random.default_rng(3)
    noise = np.repeat(rng.normal(0.0, 0.05, N_PROMPTS), N_SEEDS)
    scores = runs[2].scores + noise - noise.mean()  # mean exactly ddim-8's
    c = compare_to_frontier("noisy", _const(8.0), scores, runs, prompt_ids, n_boot=500)
    assert c.gain == pytest.approx(0.0, abs=1e-12)
    assert c.ci[0] < 0.0 < c.ci[1]


def test_compare_validates_lengths() -> None:
    runs, prompt_ids, _, _ = _easy_hard()
    with pytest.raises(ValueError, match="'p': scores has shape"):
        compare_to_frontier("p", _const(4.0), _const(0.5, N - 1), runs, prompt_ids)
    with pytest.raises(ValueError, match="prompt_ids"):
        compare_to_frontier("p", _const(4.0), _const(0.5), runs, prompt_ids[:-1])


def test_runs_are_validated() -> None:
    with pytest.raises(ValueError, match="no fixed runs"):
        fixed_frontier([])
    bad = [FixedRun("a", "s", 2, _const(0.1, 3)), FixedRun("b", "s", 4, _const(0.1, 4))]
    with pytest.raises(ValueError, match="'b' has 4 items but 'a' has 3"):
        oracle_items(bad)
    with pytest.raises(ValueError, match="duplicate"):
        fixed_frontier([FixedRun("a", "s", 2, _const(0.1)), FixedRun("a", "s", 4, _const(0.2))])
    with pytest.raises(ValueError, match="'a': scores contain nan"):
        fixed_frontier([FixedRun("a", "s", 2, np.array([0.1, np.nan]))])


LINE = re.compile(
    r"^frontier: method=(\S+) nfe=(\d+\.\d{2}|nan) (\w+)=(-?\d+\.\d{3}|nan) "
    r"frontier=(-?\d+\.\d{3}|nan) gain=(-?\d+\.\d{3}|nan) "
    r"ci=\[(-?\d+\.\d{3}|nan),(-?\d+\.\d{3}|nan)\] "
    r"nfe_ratio=(-?\d+\.\d{3}|nan) oracle_ratio=(-?\d+\.\d{3}|nan)$"
)


def test_line_format_and_nan() -> None:
    runs, prompt_ids, easy, _ = _easy_hard()
    nfe = np.where(easy, 2.0, 8.0)
    scores = np.where(easy, runs[0].scores, runs[2].scores)
    c = compare_to_frontier("ppo", nfe, scores, runs, prompt_ids, n_boot=100)
    m = LINE.match(c.line())
    assert m is not None, c.line()
    assert m.group(1) == "ppo" and m.group(2) == "5.00" and m.group(3) == "verifier"
    assert float(m.group(6)) == pytest.approx(c.gain, abs=5e-4)
    assert LINE.match(c.line(metric="clip_score")).group(3) == "clip_score"  # type: ignore[union-attr]

    nan = float("nan")
    c2 = FrontierComparison("x", 3.0, 0.99, 0.5, 0.49, (0.1, 0.8), nan, nan, "l", "quality")
    line = c2.line()
    assert LINE.match(line) is not None, line
    assert " quality=0.990 " in line
    assert line.endswith("nfe_ratio=nan oracle_ratio=nan")

    # A score above every fixed schedule and the oracle: both ratios are nan.
    above = compare_to_frontier("above", nfe, _const(1.5), runs, prompt_ids, n_boot=50)
    assert math.isnan(above.nfe_ratio) and math.isnan(above.oracle_ratio)
    assert above.line().endswith("nfe_ratio=nan oracle_ratio=nan")


def test_best_learned() -> None:
    def mk(name: str, gain: float) -> FrontierComparison:
        return FrontierComparison(name, 4.0, 0.5, 0.5, gain, (0.0, 0.0), 1.0, 1.0, "")

    assert best_learned([mk("a", 0.01), mk("b", 0.05), mk("c", float("nan"))]).method == "b"
    with pytest.raises(ValueError):
        best_learned([])


def test_plot_frontier_writes_png(tmp_path: Path) -> None:
    runs = _mixed_runs()
    points = {"stability-stop": (3.5, 0.5), "ppo": (3.2, 0.72)}
    out = tmp_path / "frontier.png"
    plot_frontier(out, runs, points, policies=["ppo"])
    data = out.read_bytes()
    assert len(data) > 1000 and data[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(ValueError, match="no entry in points"):
        plot_frontier(out, runs, points, policies=["missing"])
