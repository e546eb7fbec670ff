"""FQE off-policy evaluation (``addiffusion.offline_rl.ope``, ``offline-rl fqe``).

On the synthetic stop-MDP (``offline_rl_stop_mdp``) the return of a fixed stop rule is known in
closed form from each recorded trajectory's qualities, so FQE's estimate can be checked against
the truth; the rules are in the data's support (every step has a logged continue and a logged
stop), so FQE needs no extrapolation.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from d3rlpy.dataset import ReplayBuffer
from offline_rl_stop_mdp import BONUS, C_NFE, N_STEPS, make_buffer

from addiffusion.cli import run
from addiffusion.datasets.build import build_dataset
from addiffusion.datasets.config import DatasetsConfig
from addiffusion.datasets.relabel import relabel
from addiffusion.datasets.synthetic import write_synthetic_store
from addiffusion.offline_rl.cli import register
from addiffusion.offline_rl.config import OfflineRLConfig
from addiffusion.offline_rl.ope import FQESettings, fqe_estimate, trajectory_starts
from addiffusion.offline_rl.train import standard_scaler
from addiffusion.rewards.config import RewardConfig

torch.set_num_threads(1)

GAMMA = 0.99
QUALITY, CATEGORY = 5, slice(3, 5)  # observation columns (offline_rl_stop_mdp.episode_observations)
SETTINGS = FQESettings(n_steps=2000, gamma=GAMMA, hidden_units=[32, 32], seed=0)


class StopAt:
    """A fixed rule: continue (action 0) before step ``when[category]``, then stop (1).

    Stands in for a trained d3rlpy algorithm: FQE calls ``impl.predict_best_action`` (torch,
    observations scaled by ``observation_scaler`` as in a real one) and ``predict`` (numpy, raw
    observations)."""

    def __init__(self, when: dict[int, int]) -> None:
        self.when = when
        self.impl = self
        self.observation_scaler = standard_scaler(make_buffer(100, seed=0))

    def _act(self, obs: np.ndarray) -> np.ndarray:
        step = np.rint(obs[:, 0] * (N_STEPS - 1)).astype(int)
        threshold = np.where(obs[:, CATEGORY].argmax(axis=1) == 0, self.when[0], self.when[1])
        return (step >= threshold).astype(np.int64)

    def predict(self, obs: np.ndarray) -> np.ndarray:
        return self._act(np.asarray(obs))

    def predict_best_action(self, obs: torch.Tensor) -> torch.Tensor:
        raw = self.observation_scaler.reverse_transform(obs)
        return torch.as_tensor(self._act(raw.cpu().numpy()), device=obs.device)

    def true_value(self, obs: np.ndarray) -> float:
        """Discounted return from the first row of one recorded root trajectory."""
        q = obs[:, QUALITY].astype(np.float64)
        j = self.when[int(obs[0, CATEGORY].argmax())]
        steps = sum(GAMMA**i * (q[i + 1] - q[i] - C_NFE) for i in range(j))
        return float(steps + GAMMA**j * BONUS * q[j])


BEST = StopAt({0: 3, 1: 5})  # the MDP's best stop steps
EARLY = StopAt({0: 1, 1: 1})
LATE = StopAt({0: 7, 1: 7})  # the behaviour's own roots: continue to the end


def true_value(rule: StopAt, buffer: ReplayBuffer) -> float:
    """Mean true return of ``rule`` from the first state of each recorded root trajectory."""
    return float(
        np.mean([rule.true_value(np.asarray(ep.observations)) for ep in trajectory_starts(buffer)])
    )


@pytest.fixture(scope="module")
def estimates() -> dict[str, tuple[float, dict]]:
    """(truth, FQE result) per rule: FQE fitted on 100 episodes, valued on 20 others."""
    fit, val = make_buffer(100, seed=0), make_buffer(20, seed=1)
    return {
        name: (true_value(rule, val), fqe_estimate(rule, fit, SETTINGS, evaluate=val))
        for name, rule in [("best", BEST), ("early", EARLY), ("late", LATE)]
    }


def test_fqe_estimates_the_true_initial_value(estimates: dict[str, tuple[float, dict]]) -> None:
    # Measured errors are 0.01-0.03 (about 1 %; FQE's own error, the data is noise-free given the
    # state). 0.1 is 4-14 % of the values and a ninth of the smallest gap between two rules, so a
    # wrong discount, a wrong next action or an unconverged fit (e.g. the policy fed observations
    # of the wrong scale: off by 1.5 on "early") fails it.
    for name, (truth, got) in estimates.items():
        assert got["initial_value"] == pytest.approx(truth, abs=0.1), name
        assert got["n_start_episodes"] == 20


def test_fqe_ranks_policies_like_their_true_values(
    estimates: dict[str, tuple[float, dict]],
) -> None:
    by_truth = sorted(estimates, key=lambda n: estimates[n][0])
    by_fqe = sorted(estimates, key=lambda n: estimates[n][1]["initial_value"])
    assert by_truth == ["early", "late", "best"]
    assert by_fqe == by_truth


def test_behaviour_return_is_the_logged_return(
    estimates: dict[str, tuple[float, dict]],
) -> None:
    # The logged roots continue to the last step: the behaviour is the "late" rule.
    truth_late, late = estimates["late"]
    assert late["behaviour_return"] == pytest.approx(truth_late, rel=1e-6)
    assert estimates["best"][1]["behaviour_return"] == late["behaviour_return"]


def test_same_seed_same_estimate() -> None:
    fit = make_buffer(20, seed=2)
    settings = FQESettings(n_steps=200, gamma=GAMMA, hidden_units=[16], seed=3)
    first = fqe_estimate(BEST, fit, settings)
    assert fqe_estimate(BEST, fit, settings) == first
    other = fqe_estimate(
        BEST, fit, FQESettings(n_steps=200, gamma=GAMMA, hidden_units=[16], seed=4)
    )
    assert other["initial_value"] != first["initial_value"]


def test_settings_are_checked() -> None:
    with pytest.raises(ValueError, match="n_steps must be >= 1, got 0"):
        FQESettings(n_steps=0)
    with pytest.raises(ValueError, match=r"gamma must be in \(0, 1\], got 1.5"):
        FQESettings(gamma=1.5)


def test_cli_defaults_are_the_settings_defaults() -> None:
    parser = argparse.ArgumentParser(prog="addiffusion")
    register(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(
        ["offline-rl", "fqe", "--dataset", "d", "--rewards", "r", "--offline", "o"]
    )
    defaults = FQESettings()
    for name in ("n_steps", "batch_size", "learning_rate", "target_update_interval", "seed"):
        assert getattr(args, name) == getattr(defaults, name), name


def main(argv: list[str]) -> int:
    """Our subcommands only: ``addiffusion.cli.main`` imports every stage (diffusers included)."""
    parser = argparse.ArgumentParser(prog="addiffusion")
    register(parser.add_subparsers(dest="command", required=True))
    return run(parser.parse_args(argv))


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path, Path]:
    """A real dataset (synthetic store -> build -> relabel) and a 20-step iql + cql run on it."""
    root = tmp_path_factory.mktemp("ope_run")
    write_synthetic_store(root / "store", branch_step=2, n_max=5)
    dataset = build_dataset(
        root / "store", root / "dataset", DatasetsConfig(chunk_rows=20, val_fraction=0.25)
    )
    rewards = root / "rewards.parquet"
    relabel(dataset, RewardConfig(), rewards)
    params = root / "params.yaml"
    default = OfflineRLConfig()
    section = {
        "n_steps": 20,
        "n_steps_per_epoch": 20,
        "hidden_units": [8],
        "fqe": {"n_steps": 0},  # the stage's own FQE: test_offline_rl_checkpoints.py
        # Each policy's FQE discounts with its own algorithm's gamma.
        "iql": {**default.iql, "batch_size": 16, "gamma": 0.95},
        "cql": {**default.cql, "batch_size": 16, "gamma": 0.9},
    }
    params.write_text(yaml.safe_dump({"offline_rl": {**section, "baselines": ["cql"]}}))
    out = root / "offline"
    argv = ["offline-rl", "train", "--dataset", str(dataset), "--rewards", str(rewards)]
    assert main([*argv, "--out", str(out), "--params", str(params), "--quiet"]) == 0
    return dataset, rewards, out


def test_cli_evaluates_every_policy_and_writes_json(
    trained_run: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset, rewards, offline = trained_run
    capsys.readouterr()
    argv = ["offline-rl", "fqe", "--dataset", str(dataset), "--rewards", str(rewards)]
    assert main([*argv, "--offline", str(offline), "--n-steps", "50"]) == 0
    out = capsys.readouterr().out
    assert "fqe iql: initial value " in out and "fqe cql: initial value " in out
    assert "(behaviour return " in out
    report = json.loads((offline / "fqe.json").read_text())
    assert report["fit_on"] == "val" and set(report["policies"]) == {"iql", "cql"}
    for name, result in report["policies"].items():
        assert np.isfinite(result["initial_value"]) and np.isfinite(result["behaviour_return"])
        assert result["settings"]["n_steps"] == 50 and result["settings"]["hidden_units"] == [8]
        # The training run's offline_rl.<algo>.gamma
        assert result["settings"]["gamma"] == {"iql": 0.95, "cql": 0.9}[name]
        assert result["n_start_episodes"] == 4  # the 2 validation roots and their 2 branches
    # The same command again (same seed) gives the same numbers, here to --out.
    assert (
        main(
            [*argv, "--offline", str(offline), "--n-steps", "50", "--out", str(tmp_path / "o.json")]
        )
        == 0
    )
    assert json.loads((tmp_path / "o.json").read_text())["policies"] == report["policies"]


def test_cli_missing_offline_folder_exits_2(
    trained_run: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dataset, rewards, _ = trained_run
    missing = tmp_path / "no_such_run"
    argv = ["offline-rl", "fqe", "--dataset", str(dataset), "--rewards", str(rewards)]
    assert main([*argv, "--offline", str(missing)]) == 2
    err = capsys.readouterr().err
    assert str(missing) in err and "--offline" in err
    assert not (missing / "fqe.json").exists()
