from __future__ import annotations

from pathlib import Path

import numpy as np
import polars as pl
import pytest
import zarr

from addiffusion.datasets.build import prompt_val_split
from addiffusion.datasets.d3rlpy_convert import (
    TransitionCounts,
    build_episodes,
    to_replay_buffers,
    transition_counts,
)
from addiffusion.datasets.relabel import relabel
from addiffusion.diffusion.actions import ActionTable
from addiffusion.task import read_info
from addiffusion.rewards.config import RewardConfig

# conftest: train prompts 0, 1, 3, 4 (2 seeds each) -> 8 roots of 5 steps, warm-up 1, and 8
# branches leaving at step 2 (steps 3, 4).
PER_ROOT = dict(continue_=4, stop_final=1, stop_counterfactual=3, refine=0)  # cf at 1, 2, 3
PER_BRANCH = dict(continue_=1, stop_final=1, stop_counterfactual=1, refine=1)  # cf at 3


def _table(dataset: Path) -> ActionTable:
    return ActionTable.from_dict(read_info(dataset)["actions"])


@pytest.fixture(scope="module")
def rewards(dataset: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("rewards") / "rewards.parquet"
    relabel(dataset, RewardConfig(), out)
    return out


def test_transition_counts_of_each_kind(dataset: Path, rewards: Path) -> None:
    by_prompt = build_episodes(dataset, rewards)
    assert sorted(by_prompt) == [0, 1, 3, 4]  # train split only
    every = [e for eps in by_prompt.values() for e in eps]
    want = {k: 8 * PER_ROOT[k] + 8 * PER_BRANCH[k] for k in PER_ROOT}
    assert transition_counts(every) == TransitionCounts(**want, episodes=8 + 8 + 32)
    train, val = to_replay_buffers(dataset, rewards, val_fraction=0.25, seed=0)
    total = sum(want.values())
    assert train.transition_count + val.transition_count == total
    assert val.transition_count == total // 4  # one of four prompts
    val_prompt = prompt_val_split(np.array([0, 1, 3, 4]), 0.25, 0)
    assert len(val_prompt) == 1
    val_eps = by_prompt[val_prompt.pop()]
    assert sum(e.transition_count for e in val_eps) == val.transition_count
    info = train.dataset_info
    assert info.action_size == 3 and info.action_space.name == "DISCRETE"
    assert info.observation_signature.shape == [(33,)]


def test_one_step_terminal_stop_episode(dataset: Path, rewards: Path) -> None:
    train, _ = to_replay_buffers(dataset, rewards, val_fraction=0.0, seed=0)
    one_step = [e for e in train.episodes if e.size() == 1]
    assert one_step and all(e.terminated for e in one_step)
    t = train.transition_picker(one_step[0], 0)
    assert t.terminal == 1.0 and int(t.action[0]) == _table(dataset).stop
    assert not np.any(t.next_observation)  # d3rlpy pads the terminal's next state with zeros
    r = pl.read_parquet(rewards)
    assert np.isclose(t.reward[0], r["r_stop"].to_numpy()).any()
    # A root: continue transitions chain to the next state, the last one stops (terminal).
    root = next(e for e in train.episodes if e.size() == 5)
    assert root.transition_count == 5
    mid, last = train.transition_picker(root, 1), train.transition_picker(root, 4)
    assert mid.terminal == 0.0 and np.array_equal(mid.next_observation, root.observations[2])
    assert last.terminal == 1.0 and int(last.action[0]) == _table(dataset).stop
    batch = train.sample_transition_batch(16)
    assert batch.observations.shape == (16, 33) and batch.actions.shape == (16, 1)


def test_observations_follow_the_mdp_layout(dataset: Path, rewards: Path) -> None:
    by_prompt = build_episodes(dataset, rewards)
    eps = by_prompt[0]
    root = next(e for e in eps if e.size() == 5)
    branch = next(e for e in eps if e.size() == 3)
    # Episodes come in (episode_id, step) order: the first 5-step one is root 000000-0.
    ep0 = (
        pl.read_parquet(dataset / "data" / "steps")
        .filter(pl.col("episode_id") == "000000-0")
        .sort("step")
    )
    feats = zarr.open_group(dataset / "features.zarr", mode="r")["image_features"]
    np.testing.assert_array_equal(
        root.observations[:, :8], feats[...][ep0["feature_row"].to_numpy()]
    )
    np.testing.assert_allclose(root.observations[:, -5], ep0["clip_score"].to_numpy())
    q0 = 8 + 4 + 16  # quality block: clip, delta, stability, nfe/n_max, refines
    assert root.observations[0, q0 + 1] == 0.0  # no delta at step 0
    np.testing.assert_allclose(
        np.diff(root.observations[:, q0]), root.observations[1:, q0 + 1], rtol=1e-5, atol=1e-6
    )
    # A branch starts at its parent's state with REFINE; its refines_used is then 1.
    assert int(branch.actions[0, 0]) == _table(dataset).refine
    assert branch.observations[1, q0 + 4] == 1.0
    np.testing.assert_allclose(
        branch.observations[1, q0 + 1],
        branch.observations[1, q0] - branch.observations[0, q0],
        rtol=1e-5,
    )


def test_discrete_cql_trains_on_the_buffer(dataset: Path, rewards: Path, tmp_path: Path) -> None:
    import d3rlpy
    from d3rlpy.logging import NoopAdapterFactory

    train, val = to_replay_buffers(dataset, rewards, val_fraction=0.25, seed=0)
    cql = d3rlpy.algos.DiscreteCQLConfig(batch_size=8).create(device="cpu:0")
    cql.fit(
        train,
        n_steps=6,
        n_steps_per_epoch=3,
        show_progress=False,
        logger_adapter=NoopAdapterFactory(),
    )
    obs = np.stack([e.observations[0] for e in val.episodes])
    actions = cql.predict(obs)
    assert actions.shape == (len(obs),) and set(actions.tolist()) <= set(range(_table(dataset).n))
