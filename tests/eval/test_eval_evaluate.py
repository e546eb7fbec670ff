"""End-to-end evaluation on the tiny pipeline + tiny CLIP and a minimal built dataset."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from eval_fixtures import N_MAX, OBS_DIM, TABLE, WARMUP, write_dataset
from eval_fixtures import eval_cfg as _cfg
from eval_fixtures import train_random_offline as _train_random_offline
from PIL import Image

from addiffusion.cli import main
from addiffusion.config import ConfigError
from addiffusion.diffusion.actions import ActionTable
from addiffusion.eval.config import EvalConfig
from addiffusion.eval.evaluate import evaluate
from addiffusion.eval.policies import StopAtStep
from addiffusion.rewards.config import RewardConfig

SUMMARIES = ("learned", "frontier")
"""metrics.json's entries that are not methods."""


class StopNow:
    """Ignores the mask: asks to stop at every step (evaluation must enforce the warm-up)."""

    def act(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        return np.full(len(obs), TABLE.stop, np.int64)


class Recorder:
    """StopAtStep that also records the masks it was shown."""

    def __init__(self, step: int) -> None:
        self.inner = StopAtStep(step, TABLE)
        self.masks: list[np.ndarray] = []

    def act(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        self.masks.append(mask.copy())
        return self.inner.act(obs, mask)


@pytest.fixture(scope="module")
def dataset(tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    splits = ["train", "heldout", "heldout", "heldout", "train"]
    return write_dataset(tmp_path_factory.mktemp("ds"), tiny_models, splits)


@pytest.fixture(scope="module")
def result(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, Path, Recorder]:
    out = tmp_path_factory.mktemp("out")
    rec = Recorder(2)
    policies = {"stop-at-2": rec, "stop-now": StopNow(), "stop-at-1": StopAtStep(1, TABLE)}
    metrics = evaluate(dataset, policies, _cfg(), RewardConfig(), out, progress=False)
    return metrics, out, rec


def test_fixed_step_baselines_report_nfe_k(result: tuple[dict, Path, Recorder]) -> None:
    metrics, _, _ = result
    for k in (2, 4):
        for name in (f"ddim-{k}", f"ddim-ays-{k}"):  # the uniform and the ays grid
            m = metrics[name]
            assert m["kind"] == "baseline" and m["nfe"] == k and m["nfe_std"] == 0.0
            assert m["n"] == 6  # 3 held-out prompts x 2 seeds
    assert {p["name"] for p in metrics["frontier"]["per_solver"]["ddim-ays"]} <= {
        "ddim-ays-2",
        "ddim-ays-4",
    }


def test_stop_at_step_policy_nfe_and_masks(result: tuple[dict, Path, Recorder]) -> None:
    metrics, _, rec = result
    assert metrics["stop-at-2"]["nfe"] == 3 and metrics["stop-at-2"]["masked_actions"] == 0
    assert metrics["stop-at-1"]["nfe"] == 2
    assert metrics["stop-at-1"]["stopped_early"] == 1.0 and "stopped_early" not in metrics["ddim-2"]
    # Warm-up (1 step) forces continue: stopping at step 0 is replaced, each episode once.
    assert metrics["stop-now"]["nfe"] == WARMUP + 1
    assert metrics["stop-now"]["masked_actions"] == 6
    first = rec.masks[0]
    # Warm-up: jumps only (jump-1, jump-2, stop, refine).
    assert first.shape == (4, TABLE.n) and first.tolist() == [[True, True, False, False]] * 4
    # The policy's NFE is closest to ddim-4's (3 vs 2 and 4: ties go to the stronger baseline).
    assert metrics["stop-at-2"]["vs"] == "ddim-4" and metrics["stop-at-2"]["nfe_diff"] == -1.0
    assert metrics["stop-now"]["vs"] == "ddim-2"


def test_outputs_exist_and_parse(result: tuple[dict, Path, Recorder]) -> None:
    metrics, out, _ = result
    loaded = json.loads((out / "metrics.json").read_text())
    assert set(loaded) == set(metrics)
    f = loaded["frontier"]
    assert f["method"] in ("stop-at-2", "stop-now", "stop-at-1") and f["metric"] == "verifier"
    assert [p["name"] for p in f["all_solvers"]][0] == "ddim-2"
    assert f["line"].startswith(f"frontier: method={f['method']} nfe=")
    m = loaded["stop-at-2"]
    assert m["clip_score_ci_low"] <= m["clip_score_diff"] <= m["clip_score_ci_high"]
    assert set(m["by_category"]) == {"simple", "medium", "complex"}
    assert 0.0 <= m["verifier"] <= 1.0 and 0.0 <= m["verifier_acc"] <= 1.0
    assert "verifier_acc" in m["by_category"]["simple"] and "verifier_p" in m
    with (out / "pareto.csv").open() as f:
        rows = list(csv.DictReader(f))
    assert [r["method"] for r in rows] == [n for n in metrics if n not in SUMMARIES]
    assert float(rows[0]["nfe"]) == 2.0 and rows[0]["kind"] == "baseline"
    assert all(0.0 <= float(r["verifier"]) <= 1.0 for r in rows)
    # Headroom: what choosing a fixed schedule per type / prompt / item could gain at most.
    room = loaded["frontier"]["headroom"]
    assert set(room) == {
        "category",
        "prompt",
        "item",
        "category_heldout_seed",
        "prompt_heldout_seed",
    }
    # Cross-fitted on held-out seeds: real schedules (k of 2..4) that can't beat the per-item
    # oracle's best score.
    best = room["item"]["curve"][-1][1]
    for name in ("category_heldout_seed", "prompt_heldout_seed"):
        for nfe, score in room[name]["curve"]:
            assert 2.0 <= nfe <= 4.0 and score <= best + 1e-9
    gains = [room[k]["max_gain"] for k in ("category", "prompt", "item")]
    assert gains == sorted(gains)  # the more the chooser knows, the more it can gain
    items = pl.read_parquet(out / "items.parquet")
    assert items.height == 6 * (len(metrics) - len(SUMMARIES))
    assert set(items["method"]) == set(metrics) - set(SUMMARIES)
    row = items.filter(pl.col("method") == "stop-at-2").row(0, named=True)
    assert row["nfe"] == 3 and row["category"] in ("simple", "medium", "complex")
    for png in ("pareto.png", "samples.png"):
        with Image.open(out / png) as im:
            assert im.size[0] > 100 and im.size[1] > 100
    assert "| stop-at-2 | ddim-4 |" in (out / "report.md").read_text()


def test_quality_uses_dataset_stats(result: tuple[dict, Path, Recorder]) -> None:
    metrics, _, _ = result
    # Default rewards: weight 1 on clip_score; the fake dataset's stats are mean 0, std 0.1.
    for name, m in metrics.items():
        if name in SUMMARIES:
            continue
        assert m["quality"] == pytest.approx(m["clip_score"] / 0.1, rel=1e-9)


def test_same_seed_same_metrics(
    dataset: Path, result: tuple[dict, Path, Recorder], tmp_path: Path
) -> None:
    first, out, _ = result
    policies = {"stop-at-2": Recorder(2), "stop-now": StopNow(), "stop-at-1": StopAtStep(1, TABLE)}
    again = evaluate(dataset, policies, _cfg(), RewardConfig(), tmp_path / "again", False)

    def timeless(metrics: dict) -> dict:  # wall time is measured, not seeded
        return {
            k: {**v, "seconds_per_image": None} if "nfe" in v else v for k, v in metrics.items()
        }

    assert timeless(again) == timeless(first)
    assert (tmp_path / "again" / "pareto.csv").read_text() == (out / "pareto.csv").read_text()
    # Another eval.seed draws other seeds, hence other images: the comparison above can fail.
    other = _cfg(baseline_steps=[2], stability_thresholds=[], clip_delta_thresholds=[], seed=1)
    moved = evaluate(dataset, {}, other, RewardConfig(), tmp_path / "moved", False)
    assert moved["ddim-2"]["clip_score"] != first["ddim-2"]["clip_score"]


def test_no_heldout_prompts_is_an_error(tiny_models: tuple[Path, Path], tmp_path: Path) -> None:
    ds = write_dataset(tmp_path / "ds", tiny_models, ["train", "train"])
    with pytest.raises(ValueError, match="no held-out prompts.*split values: \\['train'\\]"):
        evaluate(ds, {}, _cfg(), RewardConfig(), tmp_path / "out", progress=False)


def test_config_errors_name_the_key() -> None:
    with pytest.raises(ConfigError, match="eval.baseline_steps\\[1\\] must be >= 1, got 0"):
        EvalConfig.from_dict({"baseline_steps": [2, 0]})
    with pytest.raises(ConfigError, match="unknown key eval.steps"):
        EvalConfig.from_dict({"steps": [2]})
    with pytest.raises(ConfigError, match="eval.confidence must be in \\(0, 1\\), got 1.0"):
        EvalConfig.from_dict({"confidence": 1.0})


def test_cli_runs_from_params(dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(
        "eval:\n  baseline_steps: [3]\n  solvers: [ddim]\n  grids: [uniform]\n  best_of: []\n"
        "  random_stride: false\n"
        "  stability_thresholds: []\n  clip_delta_thresholds: []\n"
        "  patience: []\n  progress_tolerances: []\n  adaptive_diffusion_thresholds: []\n"
        "  seeds_per_prompt: 1\n  n_prompts: 2\n  bootstrap_samples: 50\n  device: cpu\n"
        "rewards:\n  weights: {clip_score: 1.0, stability: 0.5}\n"
    )
    out = tmp_path / "out"
    argv = ["eval", "--dataset", str(dataset), "--out", str(out), "--params", str(params)]
    assert main([*argv, "--quiet", "--threads", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert list(metrics) == ["ddim-3", "learned", "frontier"] and metrics["ddim-3"]["n"] == 2
    assert metrics["learned"] == {"seeds": {}, "pairs": {}}  # no learned policy, no checkpoint
    assert "line" not in metrics["frontier"]  # no learned policy: no headline
    assert "ddim-3" in capsys.readouterr().out
    params.write_text("eval:\n  seeds_per_prompt: 0\n")
    assert main(argv) == 2
    assert "eval.seeds_per_prompt must be >= 1, got 0" in capsys.readouterr().err


class RefineWhenLegal:
    """Refines whenever allowed, else continues, stopping only at the last step."""

    def act(self, obs: np.ndarray, mask: np.ndarray) -> np.ndarray:
        t = ActionTable.build([1, 2], N_MAX, WARMUP, 1, 2)
        legal_continue = np.where(mask[:, t.jump(1)], t.jump(1), t.stop)
        return np.where(mask[:, t.refine], t.refine, legal_continue).astype(np.int64)


def test_refine_is_run_and_costs_k_more_nfe(tiny_models: tuple[Path, Path], tmp_path: Path) -> None:
    ds = write_dataset(tmp_path / "ds", tiny_models, ["heldout"], refine_budget=1)
    cfg = _cfg(baseline_steps=[N_MAX], stability_thresholds=[], clip_delta_thresholds=[])
    m = evaluate(ds, {"refine": RefineWhenLegal()}, cfg, RewardConfig(), tmp_path / "o", False)
    # One refine (k = 2 re-denoise iterations) on top of the full schedule.
    assert m["refine"]["refines"] == 1.0 and m["refine"]["nfe"] == N_MAX + 2
    assert m[f"ddim-{N_MAX}"]["refines"] == 0.0


def test_collect_build_eval_end_to_end(tiny_models: tuple[Path, Path], tmp_path: Path) -> None:
    """The real chain on the tiny models: collector -> store -> datasets build -> evaluate."""
    from addiffusion.collect.collector import collect
    from addiffusion.collect.config import CollectConfig
    from addiffusion.datasets.build import build_dataset
    from addiffusion.datasets.config import DatasetsConfig

    pipe, clip = tiny_models
    collect_cfg = CollectConfig.from_dict(
        {
            "model": str(pipe),
            "scorer": str(clip),
            "n_max": 3,
            "n_prompts": 6,
            "seeds_per_prompt": 1,
            "heldout_fraction": 0.5,
            "shard_size": 6,
            "batch_size": 6,
            "device": "cpu",
        }
    )
    collect(collect_cfg, tmp_path / "store", progress=False)
    ds = build_dataset(tmp_path / "store", tmp_path / "ds", DatasetsConfig(write_webdataset=False))
    cfg = _cfg(baseline_steps=[3], stability_thresholds=[], clip_delta_thresholds=[0.0])
    m = evaluate(ds, {}, cfg, RewardConfig(), tmp_path / "out", progress=False)
    assert m["ddim-3"]["nfe"] == 3 and 2 <= m["clip-delta<0"]["nfe"] <= 3
    episodes = pl.read_parquet(sorted((ds / "data" / "episodes").glob("*.parquet")))
    n_held = episodes.filter(pl.col("split") == "heldout")["prompt_id"].n_unique()
    assert n_held >= 1 and m["ddim-3"]["n"] == 2 * n_held
    # Quality is the reward's Q with the dataset's recorded stats (default weights: clip only).
    stats = json.loads((ds / "meta" / "info.json").read_text())["component_stats"]["clip_score"]
    expected = (m["ddim-3"]["clip_score"] - stats["mean"]) / stats["std"]
    assert m["ddim-3"]["quality"] == pytest.approx(expected, rel=1e-6)
    # Builtin prompts have no verifier: neither a metric nor a plot column.
    assert "verifier" not in m["ddim-3"]
    header = (tmp_path / "out" / "pareto.csv").read_text().splitlines()[0]
    assert header == "method,kind,nfe,nfe_std,clip_score,quality"


def test_cli_evaluates_real_offline_and_online_policies(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Real (2-step) DiscreteIQL + DiscreteBC runs and a 1-iteration PPO fine-tune, loaded by the
    CLI from their output folders (sha256-checked) and run with masks."""
    from addiffusion.online_finetune.config import OnlineFinetuneConfig
    from addiffusion.online_finetune.finetune import finetune

    offline = _train_random_offline(tmp_path / "offline", OBS_DIM, ["bc"])
    online = tmp_path / "online"
    online_cfg = OnlineFinetuneConfig(
        n_envs=2, n_steps=2, iterations=1, batch_size=4, n_epochs=1, device="cpu"
    )
    finetune(dataset, offline, online_cfg, online, rewards=RewardConfig())

    params = tmp_path / "params.yaml"
    params.write_text(
        "eval:\n  baseline_steps: [2, 4]\n  solvers: [ddim]\n  grids: [uniform]\n  best_of: []\n"
        "  random_stride: false\n"
        "  stability_thresholds: []\n"
        "  clip_delta_thresholds: []\n  patience: []\n  progress_tolerances: []\n"
        "  adaptive_diffusion_thresholds: []\n"
        "  seeds_per_prompt: 1\n  bootstrap_samples: 50\n"
        "  device: cpu\n"
    )
    out = tmp_path / "out"
    argv = ["eval", "--dataset", str(dataset), "--offline", str(offline), "--online", str(online)]
    assert main([*argv, "--out", str(out), "--params", str(params), "--quiet"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    learned = ["iql", "bc", "ppo", "ppo-scratch"]  # PPO from scratch beside the fine-tune
    assert list(metrics) == ["ddim-2", "ddim-4", *learned, "learned", "frontier"]
    assert metrics["frontier"]["method"] in learned
    printed = capsys.readouterr().out.strip().splitlines()
    assert printed[-1].startswith("frontier: method=")
    # eval.pairs' defaults: PPO against its offline init and against PPO from scratch.
    assert list(metrics["learned"]["pairs"]) == ["ppo - iql", "ppo - ppo-scratch"]
    assert any(line.startswith("pair ppo - ppo-scratch: verifier ") for line in printed)
    # No ope.json (no validation split): no checkpoint analysis, no FQE.
    assert "checkpoints" not in metrics["learned"] and metrics["iql"]["fqe"] is None
    assert not any(line.startswith("fqe:") for line in printed)
    for name in learned:
        m = metrics[name]
        assert m["kind"] == "policy" and m["masked_actions"] == 0
        assert WARMUP + 1 <= m["nfe"] <= N_MAX and m["vs"] in ("ddim-2", "ddim-4")


def test_patience_and_progress_heuristics_run_in_eval(dataset: Path, tmp_path: Path) -> None:
    """The stateful patience stop (per-episode memory through the rollout) and the
    progress-based schedule run on the dataset's grid, within its NFE range."""
    cfg = _cfg(baseline_steps=[N_MAX], patience=[1], progress_tolerances=[1e-6, 2.0])
    m = evaluate(dataset, {}, cfg, RewardConfig(), tmp_path / "o", False)
    assert 2 <= m["patience-1"]["nfe"] <= N_MAX and m["patience-1"]["kind"] == "heuristic"
    # A tolerance nothing fits: jump-1 everywhere (the full grid); one everything fits: the
    # longest jump (jump-2 twice on 4 points: 0 -> 2 -> 3).
    assert m["progress<=1e-06"]["nfe"] == N_MAX
    assert m["progress<=1e-06"]["stopped_early"] == 0.0  # always reaches the last point
    assert m["progress<=2"]["nfe"] == 3


def test_cli_evaluates_a_prompt_file_the_user_brings(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    prompts = tmp_path / "mine.csv"
    prompts.write_text("prompt,category\na yellow square,mine\nthree red circles,mine\n")
    params = tmp_path / "params.yaml"
    params.write_text(
        "eval:\n  baseline_steps: [2]\n  solvers: [ddim]\n  best_of: []\n  random_stride: false\n"
        "  stability_thresholds: []\n  clip_delta_thresholds: []\n  patience: []\n"
        "  progress_tolerances: []\n  adaptive_diffusion_thresholds: []\n  seeds_per_prompt: 2\n  bootstrap_samples: 50\n"
        "  device: cpu\n"
    )
    out = tmp_path / "out"
    argv = ["eval", "--dataset", str(dataset), "--out", str(out), "--params", str(params)]
    assert main([*argv, "--prompts", str(prompts), "--quiet", "--threads", "1"]) == 0
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["ddim-2"]["n"] == 4  # 2 prompts x 2 seeds, not the dataset's held-out set
    assert set(metrics["ddim-2"]["by_category"]) == {"mine"}
    bad = tmp_path / "bad.csv"
    bad.write_text("text\nx\n")
    with pytest.raises(ValueError, match="expected a header with a Prompt"):
        main([*argv, "--prompts", str(bad), "--quiet"])


def test_adaptive_diffusion_baseline_runs_on_a_reuse_sampler(dataset: Path, tmp_path: Path) -> None:
    """Eval gives the baseline its own sampler (the dataset's grid + reuse); with threshold 0 it
    never skips and is the full fixed schedule, image for image. (Skipping: test_diffusion_reuse.)"""
    cfg = _cfg(baseline_steps=[N_MAX], adaptive_diffusion_thresholds=[0.0])
    m = evaluate(dataset, {}, cfg, RewardConfig(), tmp_path / "o", False)
    ad = m["adaptive-diffusion<=0"]
    assert ad["kind"] == "heuristic" and ad["nfe"] == N_MAX
    assert ad["clip_score"] == pytest.approx(m[f"ddim-{N_MAX}"]["clip_score"], abs=1e-6)


def test_eval_refuses_a_policy_trained_on_another_decoders_observations(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture
) -> None:
    """The dataset's observations are the VAE's; a policy whose manifest says it learned from
    preview-decoded ones is refused, by name, before anything runs (the CLI exits 2)."""
    from addiffusion.eval.cli import load_offline_policies
    from addiffusion.task import ObserverMismatch, read_task

    task = read_task(dataset)
    assert task.observer == {"observe_with": "vae", "preview": ""}
    seen = {"observe_with": "preview", "preview": "madebyollin/taesd"}
    offline = _train_random_offline(tmp_path / "offline", task.obs_dim, [], seen)
    assert json.loads((offline / "manifest.json").read_text())["observer"] == seen
    policies = load_offline_policies(offline, "cpu", ["iql"])
    with pytest.raises(
        ObserverMismatch,
        match="policy 'iql' was trained on observations decoded "
        "by the preview decoder 'madebyollin/taesd', but this dataset's "
        "observations are decoded by the full VAE",
    ):
        evaluate(dataset, policies, _cfg(), RewardConfig(), tmp_path / "out", False)
    assert not (tmp_path / "out" / "metrics.json").exists()
    params = tmp_path / "params.yaml"
    params.write_text("eval:\n  device: cpu\n")
    argv = ["eval", "--dataset", str(dataset), "--offline", str(offline), "--out"]
    assert main([*argv, str(tmp_path / "o2"), "--params", str(params), "--quiet"]) == 2
    assert "trained on observations decoded by the preview decoder" in capsys.readouterr().err
