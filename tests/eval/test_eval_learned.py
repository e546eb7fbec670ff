"""Analyses of the learned policies (addiffusion.eval.learned): Spearman, mean intervals, the
MDP's return, FQE against rollout over checkpoints, seed summaries and pairs of learned methods;
and end to end: a real offline run with checkpoints and FQE values (ope.json) and a second
training seed, evaluated through ``evaluate`` and the ``addiffusion eval`` CLI."""

from __future__ import annotations

import json
import statistics
from pathlib import Path

import numpy as np
import pytest
from eval_fixtures import OBS_DIM, eval_cfg, train_random_offline, write_dataset
from scipy.stats import spearmanr

from addiffusion.cli import main
from addiffusion.eval.evaluate import evaluate
from addiffusion.eval.learned import (
    CheckpointRun,
    base_name,
    checkpoint_report,
    episode_return,
    halves,
    mean_ci,
    pair_comparisons,
    seed_summary,
    spearman,
)
from addiffusion.eval.metrics import paired_bootstrap
from addiffusion.rewards.config import RewardConfig
from addiffusion.rewards.reward import step_reward, stop_reward

# ---------------------------------------------------------------------------------------------
# spearman


@pytest.mark.parametrize("seed", range(6))
def test_spearman_equals_scipy_with_ties(seed: int) -> None:
    rng = np.random.default_rng(seed)
    n = int(rng.integers(3, 40))
    # Few distinct values: many ties on both sides.
    x = rng.integers(0, 5, n).astype(float)
    y = x * rng.choice([-1.0, 0.5, 2.0]) + rng.integers(0, 4, n)
    if np.ptp(x) == 0 or np.ptp(y) == 0:
        x[0], y[-1] = x[0] + 1.0, y[-1] - 1.0
    assert spearman(x, y) == pytest.approx(spearmanr(x, y).statistic, abs=1e-12)
    z = rng.standard_normal(n)  # and without ties
    assert spearman(z, y) == pytest.approx(spearmanr(z, y).statistic, abs=1e-12)


def test_spearman_edge_cases() -> None:
    assert np.isnan(spearman([], []))
    assert np.isnan(spearman([1.0], [2.0]))
    assert np.isnan(spearman([1.0, 2.0], [2.0, 1.0]))  # < 3 points
    assert np.isnan(spearman([1.0, 1.0, 1.0], [1.0, 2.0, 3.0]))  # no spread
    assert np.isnan(spearman([1.0, np.nan, 3.0, 4.0], [1.0, 2.0, 3.0, 4.0]))  # NaN propagates
    assert np.isnan(spearman([1.0, 2.0, 3.0, 4.0], [1.0, 2.0, np.inf, 4.0]))
    assert spearman([1.0, 2.0, 3.0], [10.0, 20.0, 30.0]) == pytest.approx(1.0)
    assert spearman([1.0, 2.0, 3.0], [3.0, 2.0, 1.0]) == pytest.approx(-1.0)
    with pytest.raises(ValueError, match="paired values, got 3 and 2"):
        spearman([1.0, 2.0, 3.0], [1.0, 2.0])


# ---------------------------------------------------------------------------------------------
# mean_ci, episode_return


def _clustered(n_prompts: int, seeds: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    groups = np.repeat(np.arange(n_prompts), seeds)
    prompt_effect = rng.standard_normal(n_prompts)[groups]
    return 0.5 + prompt_effect + 0.3 * rng.standard_normal(len(groups)), groups


def test_mean_ci_contains_the_mean_and_narrows_with_more_data() -> None:
    widths = []
    for n_prompts in (8, 64, 512):
        values, groups = _clustered(n_prompts, 2, n_prompts)
        lo, hi = mean_ci(values, groups, 1000, 0.95, seed=0)
        assert lo < values.mean() < hi
        widths.append(hi - lo)
    assert widths[0] > widths[1] > widths[2]
    # A higher confidence gives a wider interval; the same seed the same interval.
    values, groups = _clustered(64, 2, 1)
    lo90, hi90 = mean_ci(values, groups, 1000, 0.9, seed=0)
    lo99, hi99 = mean_ci(values, groups, 1000, 0.99, seed=0)
    assert lo99 < lo90 < hi90 < hi99
    assert mean_ci(values, groups, 1000, 0.9, seed=0) == [lo90, hi90]
    # Constant values: a zero-width interval at the value (NFE of a fixed schedule).
    assert mean_ci(np.full(6, 4.0), np.repeat(np.arange(3), 2), 100, 0.95, 0) == [4.0, 4.0]


def test_mean_ci_resamples_prompts_not_items() -> None:
    """Seeds of one prompt move together: the interval reflects the prompts' spread, wider than
    an item bootstrap that treats correlated seeds as independent would give."""
    values, groups = _clustered(16, 8, 3)
    lo, hi = mean_ci(values, groups, 2000, 0.95, seed=0)
    item_lo, item_hi = mean_ci(values, np.arange(len(values)), 2000, 0.95, seed=0)
    assert hi - lo > 1.5 * (item_hi - item_lo)


def test_episode_return_formula() -> None:
    cfg = RewardConfig(c_nfe=0.05, terminal_bonus=0.5)
    q, nfe = np.array([0.2, -1.0, 3.0]), np.array([2, 4, 8])
    np.testing.assert_allclose(episode_return(q, nfe, cfg), 1.5 * q - 0.05 * nfe)
    assert episode_return(q, nfe, cfg).dtype == np.float64
    # It is the sum of the MDP's rewards along an episode, up to Q_0 - c_nfe * NFE_0 (the same
    # for every method on the same item).
    qs, nfes = np.array([0.1, 0.4, 0.3, 0.9]), np.array([1, 2, 4, 5])
    rewards = [
        float(step_reward(qs[i], qs[i + 1], nfes[i + 1] - nfes[i], cfg)) for i in range(3)
    ] + [float(stop_reward(qs[-1], cfg))]
    constant = qs[0] - cfg.c_nfe * nfes[0]
    ret = episode_return(qs[-1:], nfes[-1:], cfg)[0]
    assert sum(rewards) == pytest.approx(ret - constant, abs=1e-6)


# ---------------------------------------------------------------------------------------------
# checkpoint_report

GROUPS = np.repeat(np.arange(4), 2)  # 4 prompts x 2 seeds: prompts 0, 2 and 1, 3 are the halves
WIGGLE = 0.1 * np.sin(np.arange(8))  # per-item variation shared by every checkpoint


def _runs(method: str, level: dict[int, float], fqe: dict[int, float | None]) -> list:
    return [
        CheckpointRun(method, step, value + WIGGLE, nfe=3.0, score=0.5, fqe=fqe[step])
        for step, value in level.items()
    ]


def test_checkpoint_report_fqe_ranking_like_the_returns() -> None:
    iql = {10: 1.0, 20: 2.0, 30: 3.0}
    bc = {10: 0.5, 20: 2.5}
    runs = [
        *_runs("iql", iql, {s: 2 * v + 1 for s, v in iql.items()}),
        *_runs("bc", bc, {s: 2 * v + 1 for s, v in bc.items()}),
    ]
    r = checkpoint_report(runs, GROUPS)
    assert r["n_points"] == 5 and len(r["points"]) == 5
    assert r["spearman"] == pytest.approx(1.0)
    assert r["spearman_by_method"]["iql"] == pytest.approx(1.0)
    assert np.isnan(r["spearman_by_method"]["bc"])  # 2 points: no rank correlation
    p = r["points"][0]
    assert p == {
        "method": "iql",
        "step": 10,
        "fqe": 3.0,
        "return": pytest.approx(1.0 + WIGGLE.mean()),
        "nfe": 3.0,
        "score": 0.5,
    }
    for method, best in (("iql", 30), ("bc", 20)):
        sel = r["selection"][method]
        assert sel["fqe_pick"] == best and sel["rollout_picks"] == [best, best]
        assert sel["regret"] == pytest.approx(0.0, abs=1e-12)
        assert sel["fqe_return"] == pytest.approx(sel["rollout_return"])
        assert sel["final_return"] == pytest.approx(sel["rollout_return"])  # last is best
    assert r["selection"]["iql"]["rollout_return"] == pytest.approx(3.0 + WIGGLE.mean())


def test_checkpoint_report_fqe_ranking_reversed() -> None:
    iql = {10: 1.0, 20: 2.0, 30: 3.0}
    r = checkpoint_report(_runs("iql", iql, {s: -v for s, v in iql.items()}), GROUPS)
    assert r["spearman"] == pytest.approx(-1.0)
    assert r["spearman_by_method"]["iql"] == pytest.approx(-1.0)
    sel = r["selection"]["iql"]
    assert sel["fqe_pick"] == 10 and sel["rollout_picks"] == [30, 30]
    # Scored on the other half each time: the level difference of the two picks.
    assert sel["regret"] == pytest.approx(2.0)
    assert sel["fqe_return"] == pytest.approx(1.0 + WIGGLE.mean())


def test_checkpoint_report_points_without_fqe_are_shown_not_ranked() -> None:
    iql = {10: 1.0, 20: 2.0, 30: 3.0}
    runs = [
        *_runs("iql", iql, {10: 0.1, 20: None, 30: 0.3}),
        # A diverged fit's value (NaN) counts as none.
        *_runs("cql", {10: 5.0, 20: 6.0}, {10: None, 20: float("nan")}),
    ]
    r = checkpoint_report(runs, GROUPS)
    assert len(r["points"]) == 5 and r["n_points"] == 2
    assert [p["fqe"] for p in r["points"]][:4] == [0.1, None, 0.3, None]
    assert np.isnan(r["spearman"])  # 2 valued points
    # A method without any FQE value is neither ranked nor selected; the unvalued checkpoint
    # of iql is not a candidate of either selection.
    assert set(r["spearman_by_method"]) == set(r["selection"]) == {"iql"}
    sel = r["selection"]["iql"]
    assert sel["fqe_pick"] == 30 and sel["rollout_picks"] == [30, 30] and sel["regret"] == 0.0


def test_checkpoint_report_cross_fits_the_rollout_pick() -> None:
    """A checkpoint that is best on one half of the prompts only: the rollout's pick on each half
    is scored on the other, so picking by rollout does not win by the luck of the half."""
    groups = np.array([0, 0, 1, 1])  # prompt 0: half 0; prompt 1: half 1
    runs = [
        CheckpointRun("iql", 10, np.array([1.0, 1.0, 0.0, 0.0]), 3.0, 0.5, fqe=1.0),
        CheckpointRun("iql", 20, np.array([0.0, 0.0, 1.0, 1.0]), 3.0, 0.5, fqe=0.5),
    ]
    sel = checkpoint_report(runs, groups)["selection"]["iql"]
    assert sel["rollout_picks"] == [10, 20]
    assert sel["rollout_return"] == 0.0  # each pick scored where it is worst
    assert sel["fqe_pick"] == 10 and sel["fqe_return"] == 0.5
    assert sel["final_return"] == 0.5 and sel["regret"] == -0.5


def test_halves_alternate_over_the_prompts_whatever_their_ids() -> None:
    np.testing.assert_array_equal(halves(np.array([0, 0, 1, 1, 2, 2, 3])), [0, 0, 1, 1, 0, 0, 1])
    # Only even ids held out (a hashed split can do that): still two halves.
    np.testing.assert_array_equal(halves(np.array([12, 4, 4, 10, 12])), [0, 0, 0, 1, 0])


def test_checkpoint_report_even_prompt_ids_still_cross_fit() -> None:
    runs = _runs("iql", {10: 1.0, 20: 2.0}, {10: 2.0, 20: 1.0})
    sel = checkpoint_report(runs, 2 * GROUPS)["selection"]["iql"]  # prompts 0, 2, 4, 6
    assert sel["rollout_picks"] == [20, 20] and sel["fqe_pick"] == 10
    assert sel["regret"] == pytest.approx(1.0)


def test_checkpoint_report_with_one_prompt_selects_nothing() -> None:
    runs = _runs("iql", {10: 1.0, 20: 2.0}, {10: 1.0, 20: 2.0})
    r = checkpoint_report(runs, np.full(8, 3))  # every item of one prompt: no halves
    sel = r["selection"]["iql"]
    assert sel["fqe_pick"] == 20 and sel["rollout_picks"] == []
    assert sel["fqe_return"] is sel["rollout_return"] is sel["regret"] is None
    assert sel["final_return"] is None and np.isnan(r["spearman_by_method"]["iql"])
    assert checkpoint_report([], GROUPS)["n_points"] == 0


# ---------------------------------------------------------------------------------------------
# seed_summary, pair_comparisons


def _policy(nfe: float, verifier: float, gain: float) -> dict:
    return {"kind": "policy", "nfe": nfe, "verifier": verifier, "frontier": {"gain": gain}}


def test_seed_summary_groups_the_seeds_of_each_method() -> None:
    metrics = {
        "ddim-2": {"kind": "baseline", "nfe": 2.0, "verifier": 0.1},
        "stability>=0.9": {"kind": "heuristic", "nfe": 3.0, "verifier": 0.2},
        "stability>=0.9@seed1": {"kind": "heuristic", "nfe": 3.0, "verifier": 0.2},
        "iql": _policy(3.0, 0.50, 0.10),
        "iql@seed1": _policy(2.0, 0.30, -0.10),
        "iql@seed2": _policy(4.0, 0.40, 0.03),
        "bc": _policy(3.5, 0.2, 0.0),  # one seed: no spread to report
        "ppo-scratch@seed1": _policy(2.0, 0.1, -0.2),
        "ppo-scratch": _policy(3.0, 0.3, 0.0),
    }
    out = seed_summary(metrics, "verifier")
    assert set(out) == {"iql", "ppo-scratch"}
    row = out["iql"]
    assert row["n_seeds"] == 3 and row["methods"] == ["iql", "iql@seed1", "iql@seed2"]
    assert row["nfe_mean"] == pytest.approx(3.0)
    assert row["nfe_std"] == pytest.approx(statistics.stdev([3.0, 2.0, 4.0]))  # sample std
    assert row["verifier_mean"] == pytest.approx(0.4)
    assert row["verifier_std"] == pytest.approx(statistics.stdev([0.5, 0.3, 0.4]))
    assert row["gain_mean"] == pytest.approx(0.01)
    assert row["gain_std"] == pytest.approx(statistics.stdev([0.1, -0.1, 0.03]))
    assert out["ppo-scratch"]["n_seeds"] == 2
    assert seed_summary({"iql": _policy(3.0, 0.5, 0.1)}, "verifier") == {}
    assert base_name("ppo-scratch@seed12") == "ppo-scratch" and base_name("iql") == "iql"


def test_pair_comparisons_skip_missing_methods_and_give_paired_intervals() -> None:
    rng = np.random.default_rng(0)
    groups = np.repeat(np.arange(20), 2)
    iql = {"verifier": rng.uniform(0, 1, 40), "nfe": rng.integers(2, 6, 40).astype(float)}
    ppo = {
        "verifier": iql["verifier"] + 0.2 + 0.05 * rng.standard_normal(40),
        "nfe": iql["nfe"].copy(),
        "return": rng.standard_normal(40),  # iql has none: not compared
    }
    out = pair_comparisons(
        [("ppo", "iql"), ("ppo", "ppo-scratch"), ("cql", "iql")],
        {"ppo": ppo, "iql": iql},
        groups,
        500,
        0.95,
        seed=0,
    )
    assert list(out) == ["ppo - iql"]
    res = out["ppo - iql"]
    assert set(res) == {"verifier", "nfe"}
    v = res["verifier"]
    assert v["diff"] == pytest.approx(float(np.mean(ppo["verifier"] - iql["verifier"])))
    assert 0.0 < v["ci_low"] < v["diff"] < v["ci_high"] and v["p"] == pytest.approx(1 / 500)
    assert v == paired_bootstrap(
        ppo["verifier"], iql["verifier"], groups, 500, 0.95, np.random.default_rng(0)
    )
    # The same NFE item for item: no difference, a zero-width interval.
    assert res["nfe"]["diff"] == res["nfe"]["ci_low"] == res["nfe"]["ci_high"] == 0.0
    assert pair_comparisons([("a", "b")], {}, groups, 10, 0.9, 0) == {}


# ---------------------------------------------------------------------------------------------
# end to end: checkpoints with FQE values, seeds, through evaluate and the CLI


@pytest.fixture(scope="module")
def dataset(tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    splits = ["train", "heldout", "heldout", "heldout", "train"]  # held-out prompts 1, 2, 3
    return write_dataset(tmp_path_factory.mktemp("ds"), tiny_models, splits)


@pytest.fixture(scope="module")
def offline(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """IQL + a BC baseline, 20 steps with a checkpoint at 10, FQE on a validation split, seeds 0
    (the run's folder) and 1 (``seeds/1``)."""
    out = tmp_path_factory.mktemp("offline") / "run"
    return train_random_offline(
        out, OBS_DIM, ["bc"], n_steps=20, n_steps_per_epoch=10, fqe_steps=4, seeds=(0, 1)
    )


@pytest.fixture(scope="module")
def evaluated(
    dataset: Path, offline: Path, tmp_path_factory: pytest.TempPathFactory
) -> tuple[dict, Path, dict]:
    from addiffusion.eval.cli import load_checkpoints, load_offline_policies

    names = ["iql", "bc"]
    policies = load_offline_policies(offline, "cpu", names)
    seed1 = load_offline_policies(offline / "seeds" / "1", "cpu", names)
    policies.update({f"{n}@seed1": p for n, p in seed1.items()})
    checkpoints = load_checkpoints(offline, names, "cpu")
    out = tmp_path_factory.mktemp("eval")
    cfg = eval_cfg(pairs=["iql:bc", "ppo:iql"])
    metrics = evaluate(
        dataset, policies, cfg, RewardConfig(), out, progress=False, checkpoints=checkpoints
    )
    return metrics, out, checkpoints


def test_offline_run_values_its_checkpoints(offline: Path, evaluated: tuple) -> None:
    _, _, checkpoints = evaluated
    assert set(checkpoints) == {"iql", "bc"}
    for name, run in (("iql", offline), ("bc", offline / "baselines" / "bc")):
        ope = json.loads((run / "ope.json").read_text())
        assert [(p["step"], p["path"]) for p in ope["points"]] == [
            (10, "checkpoints/10"),
            (20, "."),
        ]
        chain = checkpoints[name]
        assert [step for step, _, _ in chain] == [10, 20]
        assert chain[0][1] is not None and chain[0][1].algo_name == name
        assert chain[1][1] is None  # the final point is the method itself
        assert [v for _, _, v in chain] == [p["initial_value"] for p in ope["points"]]


def test_evaluate_reports_fqe_against_rollout_over_checkpoints(evaluated: tuple) -> None:
    metrics, out, checkpoints = evaluated
    ck = metrics["learned"]["checkpoints"]
    assert ck["n_points"] == 4  # 2 per algorithm: the checkpoint at 10 and the final policy
    for name in ("iql", "bc"):
        mine = [p for p in ck["points"] if p["method"] == name]
        assert [p["step"] for p in mine] == [10, 20]
        # The final point is the method's own rollout.
        assert mine[-1]["return"] == pytest.approx(metrics[name]["return"])
        assert mine[-1]["nfe"] == pytest.approx(metrics[name]["nfe"])
        assert mine[-1]["fqe"] == metrics[name]["fqe"] == checkpoints[name][-1][2]
        sel = ck["selection"][name]
        assert sel["fqe_pick"] in (10, 20) and len(sel["rollout_picks"]) == 2
        assert sel["regret"] == pytest.approx(sel["rollout_return"] - sel["fqe_return"])
    assert -1.0 <= ck["spearman"] <= 1.0 or np.isnan(ck["spearman"])
    assert metrics["iql@seed1"]["fqe"] is None  # no checkpoints loaded for seed 1
    loaded = json.loads((out / "metrics.json").read_text())
    assert loaded["learned"]["checkpoints"]["n_points"] == 4
    report = (out / "report.md").read_text()
    assert "## Off-policy evaluation (FQE) against rollout, over checkpoints" in report
    assert "over 4 (policy, checkpoint) points" in report
    assert "| iql | 10 |" in report and "| bc | 20 |" in report


def test_evaluate_writes_mean_intervals_and_returns(evaluated: tuple) -> None:
    metrics, _, _ = evaluated
    methods = {n: m for n, m in metrics.items() if n not in ("learned", "frontier")}
    assert {"iql", "bc", "iql@seed1", "bc@seed1", "ddim-2"} <= set(methods)
    for name, m in methods.items():
        for key in ("nfe", "clip_score", "verifier", "quality"):
            lo, hi = m[f"{key}_ci"]
            assert lo - 1e-9 <= m[key] <= hi + 1e-9, (name, key, lo, m[key], hi)
        if m["kind"] == "policy":
            lo, hi = m["return_ci"]
            assert lo - 1e-9 <= m["return"] <= hi + 1e-9
            # RewardConfig(): terminal_bonus 1, c_nfe 0.01.
            assert m["return"] == pytest.approx(2.0 * m["quality"] - 0.01 * m["nfe"])
        else:
            assert "return" not in m and "fqe" not in m
    assert metrics["ddim-2"]["nfe_ci"] == [2.0, 2.0]


def test_evaluate_summarises_seeds_and_keeps_them_out_of_the_headline(
    dataset: Path, evaluated: tuple, offline: Path, tmp_path: Path
) -> None:
    metrics, _, _ = evaluated
    seeds = metrics["learned"]["seeds"]
    assert set(seeds) == {"iql", "bc"}
    row = seeds["iql"]
    assert row["n_seeds"] == 2 and row["methods"] == ["iql", "iql@seed1"]
    nfes = [metrics["iql"]["nfe"], metrics["iql@seed1"]["nfe"]]
    assert row["nfe_mean"] == pytest.approx(np.mean(nfes))
    assert row["nfe_std"] == pytest.approx(statistics.stdev(nfes))
    assert metrics["frontier"]["method"] in ("iql", "bc")
    assert "@seed" not in metrics["frontier"]["line"]
    # Pairs: iql - bc compared, ppo - iql skipped (no ppo evaluated).
    pairs = metrics["learned"]["pairs"]
    assert list(pairs) == ["iql - bc"]
    assert set(pairs["iql - bc"]) == {"verifier", "quality", "nfe", "return"}
    r = pairs["iql - bc"]["return"]
    assert r["diff"] == pytest.approx(metrics["iql"]["return"] - metrics["bc"]["return"])
    # A further seed alone is evaluated and compared, but never the headline.
    from addiffusion.eval.cli import load_offline_policies

    seed1 = load_offline_policies(offline / "seeds" / "1", "cpu", ["iql", "bc"])
    only = {"iql@seed1": seed1["iql"]}
    m = evaluate(dataset, only, eval_cfg(baseline_steps=[2]), RewardConfig(), tmp_path, False)
    assert m["iql@seed1"]["kind"] == "policy" and "frontier" in m["iql@seed1"]
    assert "method" not in m["frontier"] and "line" not in m["frontier"]


def test_cli_prints_the_fqe_line_when_checkpoints_exist(
    dataset: Path, offline: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tmp_path / "params.yaml"
    text = (
        "eval:\n  baseline_steps: [2]\n  solvers: [ddim]\n  grids: [uniform]\n  best_of: []\n"
        "  random_stride: false\n  stability_thresholds: []\n  clip_delta_thresholds: []\n"
        "  patience: []\n  progress_tolerances: []\n  adaptive_diffusion_thresholds: []\n"
        "  seeds_per_prompt: 1\n  bootstrap_samples: 50\n  device: cpu\n"
        "  pairs: ['iql:bc']\n{checkpoints}"
        "offline_rl:\n  algo: iql\n  baselines: [bc]\n  seeds: [0, 1]\n"
    )
    params.write_text(text.format(checkpoints=""))
    out = tmp_path / "out"
    argv = ["eval", "--dataset", str(dataset), "--offline", str(offline), "--params", str(params)]
    assert main([*argv, "--out", str(out), "--quiet", "--threads", "1"]) == 0
    printed = capsys.readouterr().out.splitlines()
    fqe = [line for line in printed if line.startswith("fqe: spearman=")]
    # Both seeds' checkpoints: 2 algorithms x 2 seeds x 2 points.
    assert len(fqe) == 1 and fqe[0].endswith("over 8 (policy, checkpoint) points")
    assert any(line.startswith("pair iql - bc: verifier ") for line in printed)
    assert printed[-1].startswith("frontier: method=")
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["ddim-2", "iql", "bc", "iql@seed1", "bc@seed1", "learned", "frontier"]
    assert metrics["frontier"]["method"] in ("iql", "bc")
    assert set(metrics["learned"]["seeds"]) == {"iql", "bc"}
    # eval.checkpoints false: no checkpoint rollouts, no fqe line.
    params.write_text(text.format(checkpoints="  checkpoints: false\n"))
    assert main([*argv, "--out", str(tmp_path / "o2"), "--quiet", "--threads", "1"]) == 0
    assert "fqe: spearman=" not in capsys.readouterr().out
    metrics = json.loads((tmp_path / "o2" / "metrics.json").read_text())
    assert "checkpoints" not in metrics["learned"]
