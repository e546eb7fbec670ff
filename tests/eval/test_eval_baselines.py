"""``addiffusion eval baselines`` + ``eval --baselines``: the non-policy runs computed once, stored
without pickle, checked against the settings they were computed with, and giving the same outputs
as an evaluation that runs everything itself."""

from __future__ import annotations

import dataclasses
import itertools
import json
import zipfile
from pathlib import Path

import numpy as np
import polars as pl
import pytest
import yaml
from eval_fixtures import write_dataset

import addiffusion.eval.rollout as rollout
from addiffusion.cli import main
from addiffusion.config import UserError
from addiffusion.diffusion.actions import ActionTable
from addiffusion.eval.baselines import (
    BASELINE_KEYS,
    POLICY_ONLY_KEYS,
    load_baselines,
    save_baselines,
)
from addiffusion.eval.config import EvalConfig
from addiffusion.eval.evaluate import evaluate, run_baselines
from addiffusion.eval.policies import StopAtStep
from addiffusion.rewards.config import RewardConfig

REPO = Path(__file__).resolve().parents[2]
TABLE = ActionTable.build([1, 2], 4, 1, 0, 2)
OUTPUTS = ("metrics.json", "pareto.csv", "report.md")


def _cfg(**kw: object) -> EvalConfig:
    """Every kind of baseline, each once, on the tiny pipeline."""
    base = dict(
        baseline_steps=[2, 4],
        solvers=["ddim"],
        best_of=[2],
        best_of_steps=[2],
        stability_thresholds=[0.9],
        clip_delta_thresholds=[0.01],
        patience=[1],
        progress_tolerances=[0.05],
        adaptive_diffusion_thresholds=[0.05],
        seeds_per_prompt=2,
        batch_size=4,
        bootstrap_samples=100,
        device="cpu",
    )
    base.update(kw)
    return EvalConfig(**base)  # type: ignore[arg-type]


def _policies() -> dict:
    return {"stop-at-2": StopAtStep(2, TABLE), "stop-at-1": StopAtStep(1, TABLE)}


def _checkpoints() -> dict:
    return {"stop-at-2": [(1, StopAtStep(1, TABLE), 0.5), (2, None, 0.7)]}


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> None:
    """Wall time is measured, not seeded: a clock that ticks once per reading makes every run's
    ``seconds`` a count of readings, the same whenever the run happens."""
    ticks = itertools.count()
    monkeypatch.setattr(rollout, "time", type("T", (), {"perf_counter": lambda: next(ticks)}))


@pytest.fixture(scope="module")
def dataset(tiny_models: tuple[Path, Path], tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_dataset(tmp_path_factory.mktemp("ds"), tiny_models, ["heldout"] * 2 + ["train"])


def test_precomputed_baselines_give_the_same_outputs(
    dataset: Path, tmp_path: Path, clock: None
) -> None:
    cfg = _cfg()
    whole = evaluate(
        dataset,
        _policies(),
        cfg,
        RewardConfig(),
        tmp_path / "whole",
        progress=False,
        checkpoints=_checkpoints(),
    )
    computed = run_baselines(dataset, cfg, progress=False)
    save_baselines(computed, tmp_path / "baselines")
    loaded = load_baselines(tmp_path / "baselines")
    # Stored exactly: every array and number of every run, in the same order.
    assert [b.name for b in loaded.runs] == [b.name for b in computed.runs]
    assert loaded.fixed == computed.fixed and loaded.fingerprint == computed.fingerprint
    for a, b in zip(computed.runs, loaded.runs, strict=True):
        assert (a.kind, a.sampler, a.run.masked_actions, a.run.seconds) == (
            b.kind,
            b.sampler,
            b.run.masked_actions,
            b.run.seconds,
        )
        for field in ("nfe", "stop_step", "refines", "images"):
            x, y = getattr(a.run, field), getattr(b.run, field)
            assert x.dtype == y.dtype and np.array_equal(x, y)
        assert list(a.run.components) == list(b.run.components)
        for k, v in a.run.components.items():
            assert v.dtype == b.run.components[k].dtype and np.array_equal(v, b.run.components[k])
    split = evaluate(
        dataset,
        _policies(),
        cfg,
        RewardConfig(),
        tmp_path / "split",
        progress=False,
        checkpoints=_checkpoints(),
        baselines=loaded,
    )
    assert json.dumps(split) == json.dumps(whole)  # (NaN != NaN: compare the texts)
    for name in OUTPUTS:
        assert (tmp_path / "split" / name).read_bytes() == (tmp_path / "whole" / name).read_bytes()
    items = pl.read_parquet(tmp_path / "split" / "items.parquet")
    assert items.equals(pl.read_parquet(tmp_path / "whole" / "items.parquet"))
    # Every kind of method took part, in the one-go run's order (policies before
    # AdaptiveDiffusion), and the checkpoint rollouts too.
    names = [n for n in whole if n not in ("learned", "frontier")]
    assert names == [
        "ddim-2",
        "ddim-4",
        "ddim-ays-2",
        "ddim-ays-4",
        "best-of-2-ddim-2",
        "random-stride",
        "stability>=0.9",
        "clip-delta<0.01",
        "patience-1",
        "progress<=0.05",
        "stop-at-2",
        "stop-at-1",
        "adaptive-diffusion<=0.05",
    ]
    assert whole["learned"]["checkpoints"]["n_points"] == 2
    # The outputs depend on the rewards, which the stored runs do not: another weight, the same
    # stored runs, the same outputs as a run of everything with that weight.
    rewards = RewardConfig(weights={"clip_score": 1.0, "verifier": 0.5})
    again = evaluate(dataset, {}, cfg, rewards, tmp_path / "r1", progress=False, baselines=loaded)
    assert json.dumps(again) == json.dumps(
        evaluate(dataset, {}, cfg, rewards, tmp_path / "r2", progress=False)
    )
    assert again["ddim-2"]["quality"] != whole["ddim-2"]["quality"]


def test_the_folder_is_an_index_and_one_npz_per_method_without_pickle(
    dataset: Path, tmp_path: Path
) -> None:
    cfg = _cfg(
        baseline_steps=[2],
        grids=["uniform"],
        best_of=[],
        random_stride=False,
        clip_delta_thresholds=[],
        patience=[],
        progress_tolerances=[],
    )
    out = tmp_path / "b"
    (out / "stale").mkdir(parents=True)  # replaced whole, never merged into
    save_baselines(run_baselines(dataset, cfg, progress=False), out)
    index = json.loads((out / "index.json").read_text())
    assert index["format"] == 1 and index["fixed"] == [["ddim-2", "ddim", 2]]
    assert [(m["name"], m["kind"], m["sampler"]) for m in index["methods"]] == [
        ("ddim-2", "baseline", "k-point"),
        ("stability>=0.9", "heuristic", "dataset"),
        ("adaptive-diffusion<=0.05", "heuristic", "reuse"),
    ]
    assert sorted(p.name for p in out.iterdir()) == sorted(
        ["index.json", *(m["file"] for m in index["methods"])]
    )
    assert not list(tmp_path.glob(".b.*"))  # no temporary folder left behind
    fp = index["fingerprint"]
    assert set(fp) == {"eval", "device", "info_sha256", "prompts", "items", "prompts_sha256"}
    assert set(fp["eval"]) == set(BASELINE_KEYS)
    assert fp["device"] == "cpu" and fp["prompts"] is None
    assert fp["items"] == [[0, 0], [0, 1], [1, 2], [1, 3]]  # prompt ids 0, 1; 2 seeds each
    for m in index["methods"]:
        with zipfile.ZipFile(out / m["file"]) as z:
            members = sorted(z.namelist())
        assert members == sorted(
            ["nfe.npy", "stop_step.npy", "refines.npy", "images.npy"]
            + [f"component.{c}.npy" for c in m["components"]]
        )
        with np.load(out / m["file"], allow_pickle=False) as z:
            assert z["images"].dtype == np.uint8 and z["images"].shape[0] == 4
            assert z["nfe"].dtype == np.int64
    # A file altered after the fact is refused, by name.
    victim = out / index["methods"][1]["file"]
    victim.write_bytes(victim.read_bytes()[:-8])
    with pytest.raises(UserError, match=f"{victim.name} is not the file index.json records"):
        load_baselines(out)
    with pytest.raises(UserError, match="index.json not found.*eval baselines"):
        load_baselines(tmp_path / "nowhere")


def test_only_policy_keys_are_left_out_of_the_fingerprint() -> None:
    fields = {f.name for f in dataclasses.fields(EvalConfig)}
    assert set(BASELINE_KEYS) | set(POLICY_ONLY_KEYS) == fields
    assert set(POLICY_ONLY_KEYS) == {"checkpoints", "pairs", "bootstrap_samples", "confidence"}


def test_baselines_for_other_settings_are_refused_naming_the_keys(
    dataset: Path,
    tiny_models: tuple[Path, Path],
    tmp_path: Path,
) -> None:
    cfg = _cfg(
        baseline_steps=[2],
        grids=["uniform"],
        best_of=[],
        random_stride=False,
        stability_thresholds=[],
        clip_delta_thresholds=[],
        patience=[],
        progress_tolerances=[],
        adaptive_diffusion_thresholds=[],
    )
    baselines = run_baselines(dataset, cfg, progress=False)

    def refused(cfg: EvalConfig, ds: Path = dataset, prompts: str | None = None) -> str:
        with pytest.raises(UserError) as e:
            evaluate(
                ds, {}, cfg, RewardConfig(), tmp_path / "o", False, prompts, baselines=baselines
            )
        assert "addiffusion eval baselines" in str(e.value)
        assert "dvc repro eval_baselines" in str(e.value)
        assert not (tmp_path / "o").exists()
        return str(e.value)

    msg = refused(dataclasses.replace(cfg, baseline_steps=[2, 4], batch_size=2))
    assert "eval.baseline_steps ([2] there, [2, 4] here)" in msg
    assert "eval.batch_size (4 there, 2 here)" in msg
    assert "eval.solvers" not in msg
    assert "eval.seed (0 there, 1 here)" in refused(dataclasses.replace(cfg, seed=1))
    msg = refused(dataclasses.replace(cfg, n_prompts=1))
    assert "held-out (prompt id, seed) pairs (4 pairs there, 2 here)" in msg
    other = write_dataset(tmp_path / "ds2", tiny_models, ["heldout"] * 2 + ["train"], n_max=3)
    assert "the dataset's meta/info.json" in refused(cfg, other)
    prompts = tmp_path / "mine.txt"
    prompts.write_text("a yellow square\nthree red circles\n")
    assert "--prompts (None there" in refused(cfg, prompts=str(prompts))
    # The keys only the policies' part reads may differ.
    fine = dataclasses.replace(
        cfg, bootstrap_samples=50, confidence=0.9, pairs=["a:b"], checkpoints=False
    )
    m = evaluate(dataset, {}, fine, RewardConfig(), tmp_path / "ok", False, baselines=baselines)
    assert m["ddim-2"]["n"] == 4


def test_cli_eval_baselines_then_eval_with_them(
    dataset: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tmp_path / "params.yaml"
    eval_params = (
        "eval:\n  baseline_steps: [2]\n  solvers: [ddim]\n  grids: [uniform]\n  best_of: []\n"
        "  random_stride: false\n  stability_thresholds: [0.9]\n  clip_delta_thresholds: []\n"
        "  patience: []\n  progress_tolerances: []\n  adaptive_diffusion_thresholds: []\n"
        "  seeds_per_prompt: 1\n  bootstrap_samples: 50\n  device: cpu\n"
    )
    params.write_text(eval_params)
    base = tmp_path / "eval_baselines"
    argv = ["eval", "baselines", "--dataset", str(dataset), "--out", str(base)]
    assert main([*argv, "--params", str(params), "--quiet", "--threads", "1"]) == 0
    out = capsys.readouterr().out
    assert out.strip().splitlines()[-1] == (
        f"eval baselines: wrote 2 runs (1 fixed schedules) to {base}"
    )
    assert (base / "index.json").is_file()
    argv = ["eval", "--dataset", str(dataset), "--baselines", str(base), "--params", str(params)]
    assert main([*argv, "--out", str(tmp_path / "e"), "--quiet"]) == 0
    metrics = json.loads((tmp_path / "e" / "metrics.json").read_text())
    assert {"ddim-2", "stability>=0.9"} <= set(metrics)
    assert "ddim-2" in capsys.readouterr().out
    # The eval's params moved on, the stored runs did not: exit 2, one line naming the key.
    params.write_text(eval_params.replace("[0.9]", "[0.95]"))
    assert main([*argv, "--out", str(tmp_path / "e2"), "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "eval.stability_thresholds ([0.9] there, [0.95] here)" in err
    assert "dvc repro eval_baselines" in err and len(err.strip().splitlines()) == 1
    with pytest.raises(SystemExit) as e:
        main(["eval", "--params", str(params)])
    assert e.value.code == 2 and "--dataset" in capsys.readouterr().err


def test_dvc_eval_stage_reads_the_stored_baselines() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    base, ev = stages["eval_baselines"], stages["eval"]
    assert base["cmd"].split()[:3] == ["addiffusion", "eval", "baselines"]
    assert "results/eval_baselines" in base["outs"]
    assert set(base["params"]) == {f"eval.{k}" for k in BASELINE_KEYS}
    assert "--baselines results/eval_baselines" in ev["cmd"]
    assert "results/eval_baselines" in ev["deps"]
    eval_keys = {p for p in ev["params"] if p.startswith("eval.")}
    assert {f"eval.{k}" for k in POLICY_ONLY_KEYS} <= eval_keys
    # Those that only pick the baselines are the baselines stage's alone: changing them re-runs
    # eval through its results/eval_baselines dependency.
    assert not eval_keys & {"eval.baseline_steps", "eval.solvers", "eval.stability_thresholds"}
    assert set(base["params"]) | eval_keys == {
        f"eval.{f.name}" for f in dataclasses.fields(EvalConfig)
    }
    names = list(stages)
    assert names.index("eval_baselines") == names.index("eval") - 1
