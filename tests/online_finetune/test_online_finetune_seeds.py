"""One online-finetune call trains, per seed, PPO from the offline actor and PPO from scratch:
the output layout, the manifests, comparable curves, reproducibility, the reward-hacking watch
and offline ablations carried through (tiny models, real 2-step DiscreteIQL runs)."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from online_finetune_consts import OBS_DIM
from online_finetune_offline import LAYOUT, train_tiny_offline

from addiffusion.cli import main
from addiffusion.online_finetune.config import OnlineFinetuneConfig
from addiffusion.online_finetune.env import SamplerVectorEnv
from addiffusion.online_finetune.finetune import count_hacked, finetune
from addiffusion.online_finetune.offline_init import load_offline_networks
from addiffusion.online_finetune.ppo import load_finetuned_policy
from addiffusion.rewards.config import RewardConfig

CFG = {"n_envs": 2, "n_steps": 4, "iterations": 2, "batch_size": 4, "n_epochs": 2, "device": "cpu"}
FILES = ("actor.safetensors", "manifest.json", "metrics.json", "training.csv")
COLUMNS = ("iteration", "global_step", "charts/episodic_return", "charts/hacking_share")


@pytest.fixture(scope="module")
def offline_seeds(tmp_path_factory: pytest.TempPathFactory, sampler) -> Path:
    """An offline run with seeds [0, 2]: seed 2 under ``seeds/2/``."""
    return train_tiny_offline(tmp_path_factory.mktemp("offline"), sampler.table, seeds=[0, 2])


def _header(path: Path) -> list[str]:
    with path.open() as f:
        return next(csv.reader(f))


def test_scratch_and_seeds_layout(tmp_path: Path, tiny_dataset: Path, offline_seeds: Path) -> None:
    params = tmp_path / "params.yaml"
    params.write_text(yaml.safe_dump({"online_finetune": {**CFG, "seeds": [0, 2]}}))
    out = tmp_path / "ft"
    args = ["online-finetune", "--dataset", str(tiny_dataset), "--offline", str(offline_seeds)]
    assert main([*args, "--out", str(out), "--params", str(params), "--quiet"]) == 0

    runs = {".": (0, "offline"), "scratch": (0, "scratch")}
    runs |= {"seeds/2": (2, "offline"), "seeds/2/scratch": (2, "scratch")}
    index = json.loads((out / "seeds" / "index.json").read_text())
    assert index == {
        "seeds": [0, 2],
        "runs": {
            "0": {"offline": ".", "scratch": "scratch"},
            "2": {"offline": "seeds/2", "scratch": "seeds/2/scratch"},
        },
    }
    headers = set()
    actors = {}
    for where, (seed, init) in runs.items():
        run = out / where
        assert all((run / f).is_file() for f in FILES), where
        manifest = json.loads((run / "manifest.json").read_text())
        assert (manifest["init"], manifest["seed"], manifest["offline_algo"]) == (init, seed, "iql")
        offline = offline_seeds / "seeds" / "2" if seed == 2 else offline_seeds
        assert manifest["source"]["offline"] == str(offline)
        assert manifest["source"]["offline_seed_folder"] is (seed == 2)
        assert manifest["critic_init"] == ("offline V" if init == "offline" else "fresh")
        metrics = json.loads((run / "metrics.json").read_text())
        assert (metrics["init"], metrics["seed"], metrics["global_step"]) == (init, seed, 16)
        # no verifier component in this dataset: the watch is null, its columns empty
        assert metrics["charts/hacking_share_overall"] is None
        assert all(r["charts/hacking_share"] is None for r in metrics["history"])
        header = _header(run / "training.csv")
        assert set(COLUMNS) <= set(header)
        headers.add(tuple(header))
        policy = load_finetuned_policy(run)
        # unrestricted: every action allowed (null or the whole list), nothing dropped
        assert (policy.allowed is None or policy.allowed.all()) and policy.keep is None
        actors[where] = policy.actor
    assert len(headers) == 1  # the same columns in every run: curves on the same axes

    # scratch: the offline run's observation standardisation, its own weights
    nets = load_offline_networks(offline_seeds)
    for where in ("scratch", "."):
        std = actors[where].standardize
        assert np.array_equal(std.mean, nets.actor.standardize.mean)
        assert np.array_equal(std.std, nets.actor.standardize.std)
    obs = np.random.default_rng(0).standard_normal((32, OBS_DIM)).astype(np.float32)
    with torch.no_grad():
        init = nets.actor(torch.from_numpy(obs)).numpy()
    tuned = load_finetuned_policy(out).logits(obs)
    scratch = load_finetuned_policy(out / "scratch").logits(obs)
    # two PPO iterations at lr 1e-4 stay near the IQL actor; the scratch actor is elsewhere
    assert np.abs(tuned - init).max() < np.abs(scratch - init).max()

    # same seed, same machine, same threads: the same actors, whatever ran before
    again = tmp_path / "again"
    cfg = OnlineFinetuneConfig.from_dict({**CFG, "seeds": [2]})
    finetune(tiny_dataset, offline_seeds, cfg, again, rewards=RewardConfig())
    for a, b in (("seeds/2", "."), ("seeds/2/scratch", "scratch")):
        assert (out / a / FILES[0]).read_bytes() == (again / b / FILES[0]).read_bytes(), a
    assert [p.name for p in (again / "seeds").iterdir()] == ["index.json"]  # no other seed

    # from_scratch: false leaves no scratch/ (a stale one from before is removed)
    cfg = OnlineFinetuneConfig.from_dict({**CFG, "iterations": 1, "from_scratch": False})
    runs_written = finetune(tiny_dataset, offline_seeds, cfg, again, rewards=RewardConfig())
    assert list(runs_written) == ["."] and not (again / "scratch").exists()


def test_count_hacked() -> None:
    eps = [
        {"clip_score_delta": 0.1, "verifier_delta": -0.2},  # hacked
        {"clip_score_delta": 0.1, "verifier_delta": 0.0},  # verifier did not fall
        {"clip_score_delta": -0.1, "verifier_delta": -0.2},  # CLIP did not rise
        {"clip_score_delta": 0.2, "verifier_delta": -0.1},  # hacked
    ]
    assert count_hacked(eps, watched=True) == 2
    assert count_hacked(eps, watched=False) is None
    assert count_hacked([], watched=True) == 0


def test_hacking_share_with_a_verifier(
    tmp_path: Path, verified_dataset: Path, offline_seeds: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """On a task with a verifier component the watch is a number per iteration with episodes
    (the shapes verifier scores the tiny model's images 0, so nothing is hacked here; the rule
    is test_count_hacked's and the deltas the env's own test's), and the log line prints it."""
    cfg = OnlineFinetuneConfig.from_dict({**CFG, "from_scratch": False})
    out = tmp_path / "ft"
    finetune(verified_dataset, offline_seeds, cfg, out, rewards=RewardConfig(), log=print)
    assert "charts/hacking_share" in capsys.readouterr().out
    metrics = json.loads((out / "metrics.json").read_text())
    for row in metrics["history"]:
        if row["charts/episodes"]:
            assert row["charts/hacking_share"] == 0.0 and row["charts/hacked_episodes"] == 0
    assert metrics["charts/hacking_share_overall"] == 0.0


def test_offline_ablation_carries_into_both_runs(
    tmp_path: Path, tiny_dataset: Path, sampler, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An offline run restricted to jump-1 + stop and blind to the quality part: PPO from it and
    from scratch take only those actions, see zeros there, and their actors record and apply
    both restrictions."""
    t = sampler.table
    offline = train_tiny_offline(
        tmp_path / "offline", t, action_space="stop_only", drop_observations=["quality"]
    )
    nets = load_offline_networks(offline, t)
    assert nets.ablation.allowed_actions == ("jump-1", "stop")
    assert nets.ablation.observation_drop == ("quality",)
    keep = LAYOUT.keep_mask(["quality"])

    taken: list[int] = []
    seen: list[np.ndarray] = []
    real_step = SamplerVectorEnv.step

    def spy(self, actions):
        taken.extend(np.asarray(actions).tolist())
        out = real_step(self, actions)
        seen.append(out[0])
        return out

    monkeypatch.setattr(SamplerVectorEnv, "step", spy)
    cfg = OnlineFinetuneConfig.from_dict({**CFG, "iterations": 1})
    out = tmp_path / "ft"
    finetune(tiny_dataset, offline, cfg, out, rewards=RewardConfig())
    assert len(taken) == 2 * 8 and set(taken) <= {t.jump(1), t.stop}
    assert all((obs[:, ~keep] == 0).all() for obs in seen)

    obs = np.random.default_rng(1).standard_normal((16, OBS_DIM)).astype(np.float32)
    for run in (out, out / "scratch"):
        manifest = json.loads((run / "manifest.json").read_text())
        assert manifest["allowed_actions"] == ["jump-1", "stop"]
        assert manifest["observation_drop"] == ["quality"]
        assert manifest["observation"] == LAYOUT.to_dict()
        policy = load_finetuned_policy(run)
        assert set(policy.act(obs, np.ones((16, t.n), bool)).tolist()) <= {t.jump(1), t.stop}
        blind = obs.copy()
        blind[:, ~keep] = 0
        np.testing.assert_array_equal(policy.logits(obs), policy.logits(blind))
