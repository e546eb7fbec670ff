"""The real pipeline end to end: `dvc repro` on the built-in shapes world with tiny settings, then
DVC's incremental behaviour: a second repro does nothing, a reward weight re-runs relabel and the
stages after it but not collect or build."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
EVAL = {"eval_baselines", "eval"} & set(yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"])
"""The eval stages: eval, and eval_baselines where dvc.yaml runs the fixed baselines apart (they
depend on no policy and no reward weight, so only a first repro runs them)."""
TINY = {
    "collect": {
        "n_prompts": 8,
        "seeds_per_prompt": 1,
        "n_max": 4,
        "shard_size": 4,
        "batch_size": 4,
        "heldout_fraction": 0.25,
    },
    "offline_rl": {
        "n_steps": 40,
        "n_steps_per_epoch": 20,  # one checkpoint (step 20), valued by FQE and rolled out by eval
        "baselines": ["cql"],
        "hidden_units": [16, 16],
        "fqe": {"n_steps": 20, "batch_size": 32},
        "iql": {"batch_size": 32},
        "cql": {"batch_size": 32},
    },
    "online_finetune": {"n_envs": 2, "n_steps": 4, "iterations": 1, "batch_size": 8, "n_epochs": 1},
    "eval": {
        "baseline_steps": [2, 4],
        "seeds_per_prompt": 1,
        "bootstrap_samples": 50,
        "stability_thresholds": [0.9],
        "clip_delta_thresholds": [0.01],
    },
}


def _merge(base: dict, values: dict) -> dict:
    """``base`` with ``values`` merged in key by key, nested mappings too (``offline_rl.iql``
    keeps the params.yaml settings it does not override)."""
    out = dict(base)
    for key, value in values.items():
        old = out.get(key)
        out[key] = (
            _merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
        )
    return out


def _run(args: list[str], cwd: Path, stdout_only: bool = False) -> str:
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    for who in ("AUTHOR", "COMMITTER"):  # `dvc exp run` commits
        env.setdefault(f"GIT_{who}_NAME", "addiffusion tests")
        env.setdefault(f"GIT_{who}_EMAIL", "tests@addiffusion.invalid")
    bindir = str(Path(sys.executable).parent)  # the `addiffusion` script of this environment
    env["PATH"] = bindir + os.pathsep + env.get("PATH", "")
    out = subprocess.run(args, cwd=cwd, env=env, capture_output=True, text=True)
    assert out.returncode == 0, (
        f"{' '.join(args)} failed:\n{out.stdout[-3000:]}\n{out.stderr[-3000:]}"
    )
    return out.stdout if stdout_only else out.stdout + out.stderr


def _stages_run(log: str) -> set[str]:
    return {line.split("'")[1] for line in log.splitlines() if line.startswith("Running stage '")}


@pytest.fixture(scope="module")
def project(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("git") is None:
        pytest.skip("git is needed by dvc")
    root = tmp_path_factory.mktemp("project")
    for name in ("dvc.yaml", "dvc.lock", "params.yaml", ".dvcignore", ".gitignore"):
        shutil.copy(REPO / name, root / name)
    shutil.copytree(REPO / ".dvc", root / ".dvc", ignore=shutil.ignore_patterns("tmp", "cache"))
    # The stages depend on the package's code: a copy keeps the test from touching the checkout.
    shutil.copytree(
        REPO / "addiffusion", root / "addiffusion", ignore=shutil.ignore_patterns("__pycache__")
    )
    shutil.copytree(
        REPO / "assets" / "shapes",
        root / "assets" / "shapes",
        ignore=shutil.ignore_patterns("checkpoints"),
    )
    params = _merge(yaml.safe_load((root / "params.yaml").read_text()), TINY)
    (root / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    _run(["git", "init", "-q"], root)
    return root


def test_dvc_repro_end_to_end_and_incremental(project: Path) -> None:
    # The exported policy and what it depends on (the benchmarks are stages of their own).
    first = _run(["dvc", "repro", "export_policy"], project)
    assert _stages_run(first) == {
        "collect",
        "build",
        "relabel",
        "offline_rl",
        "online_finetune",
        *EVAL,
        "export_policy",
    }
    metrics = json.loads((project / "results/eval/metrics.json").read_text())
    assert metrics["ddim-2"]["nfe"] == 2 and metrics["ddim-4"]["nfe"] == 4
    assert {"iql", "cql", "ppo"} <= set(metrics)
    assert (project / "results/eval/pareto.png").stat().st_size > 0
    info = json.loads((project / "data/dataset/meta/info.json").read_text())
    assert info["sampler"]["n_max"] == 4 and "verifier" in info["components"]
    assert "verifier" in metrics["ddim-4"]

    package = json.loads((project / "models/policy/config.json").read_text())
    assert package["algo"] == metrics["frontier"]["method"]
    assert (project / "models/policy/model.safetensors").is_file()
    assert (project / "models/policy/README.md").is_file()

    assert _stages_run(_run(["dvc", "repro", "export_policy"], project)) == set()

    params = yaml.safe_load((project / "params.yaml").read_text())
    params["rewards"]["weights"]["stability"] = 0.5
    (project / "params.yaml").write_text(yaml.safe_dump(params, sort_keys=False))
    third = _stages_run(_run(["dvc", "repro", "export_policy"], project))
    assert third == {"relabel", "offline_rl", "online_finetune", "eval", "export_policy"}


def test_exported_policy_reproduces_eval(
    project: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    """The trained policy the pipeline exported, used as a user would (the drop-in sampler on
    the stock pipeline, `addiffusion generate`), gives exactly the images, NFE and stop points
    that eval's rollout gives with the policy as eval loads it (the .d3 / PPO files)."""
    import numpy as np
    import torch
    from diffusers import StableDiffusionPipeline
    from PIL import Image

    from addiffusion.cli import main
    from addiffusion.eval.cli import load_offline_policies, load_online_policy
    from addiffusion.eval.rollout import run_method
    from addiffusion.policy import AdaptiveDiffusionPipeline, AdaptivePolicy
    from addiffusion.task import read_task, task_sampler

    _run(["dvc", "repro", "export_policy"], project)
    monkeypatch.chdir(project)  # the package records the project's relative model paths
    package = AdaptivePolicy.from_pretrained("models/policy")
    method = package.config.algo
    if method == "ppo":
        original = load_online_policy(Path("models/online_finetune"))
    else:
        original = load_offline_policies(Path("models/offline_rl"), "cpu")[method]
    prompts = ["a red circle left of a blue square", "two green triangles", "a yellow square"]
    seeds = [0, 1, 2]
    task = read_task(Path("data/dataset"))
    ref = run_method(task_sampler(task, "cpu"), original, prompts, seeds, batch_size=3)
    pipe = StableDiffusionPipeline.from_pretrained("assets/shapes/pipeline")
    out = AdaptiveDiffusionPipeline(pipe, package)(
        prompts, generator=[torch.Generator().manual_seed(s) for s in seeds], output_type="np"
    )
    np.testing.assert_array_equal((out.images * 255).round().astype(np.uint8), ref.images)
    assert [t.nfe for t in out.traces] == ref.nfe.tolist()
    assert [t.stop_step for t in out.traces] == ref.stop_step.tolist()

    one = run_method(task_sampler(task, "cpu"), original, prompts[:1], seeds[:1], batch_size=1)
    image, trace = tmp_path / "out.png", tmp_path / "trace.json"
    args = ["generate", prompts[0], "--policy", "models/policy", "--seed", "0"]
    assert main([*args, "--out", str(image), "--trace", str(trace)]) == 0
    np.testing.assert_array_equal(np.asarray(Image.open(image).convert("RGB")), one.images[0])
    assert json.loads(trace.read_text())["nfe"] == int(one.nfe[0])


def _experiment(shown: list[dict], name: str) -> dict:
    """The entry of experiment ``name`` in `dvc exp show --json` output."""
    for row in shown:
        for exp in row.get("experiments") or []:
            for rev in exp.get("revs", []):
                if rev.get("name") == name:
                    return rev
    raise AssertionError(f"no experiment {name!r} in dvc exp show: {json.dumps(shown)[:2000]}")


def test_dvc_exp_run_keeps_every_stage_metric(project: Path) -> None:
    """An ablation through `dvc exp run -S` re-runs training and eval only, and the experiment
    holds every stage's metrics (the offline-RL and PPO ones live under models/)."""
    _run(["dvc", "repro", "export_policy"], project)
    _run(["git", "add", "-A"], project)
    _run(["git", "commit", "-qm", "baseline"], project)
    setting = "offline_rl.iql.weight_temp=3.0"
    log = _run(["dvc", "exp", "run", "-n", "temp3", "-S", setting, "eval"], project)
    assert _stages_run(log) == {"offline_rl", "online_finetune", "eval"}
    exp = _experiment(json.loads(_run(["dvc", "exp", "show", "--json"], project, True)), "temp3")
    metrics = exp["data"]["metrics"]
    for path in (
        "models/offline_rl/metrics.json",
        "models/online_finetune/metrics.json",
        "results/eval/metrics.json",
    ):
        assert metrics.get(path, {}).get("data"), f"{path} missing from the experiment: {metrics}"
    assert metrics["models/offline_rl/metrics.json"]["data"]["algo"] == "iql"
    assert exp["data"]["params"]["params.yaml"]["data"]["offline_rl"]["iql"]["weight_temp"] == 3.0
