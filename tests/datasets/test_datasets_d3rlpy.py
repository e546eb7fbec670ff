from __future__ import annotations

from collections import Counter
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
from addiffusion.datasets.synthetic import ROOT_PATTERNS, continuation, root_path
from addiffusion.diffusion.actions import ActionTable
from addiffusion.rewards.config import RewardConfig
from addiffusion.task import read_info

BRANCH_STEP = 2  # conftest.BRANCH_STEP
TRAIN_PROMPTS = [0, 1, 3, 4]  # conftest: 6 prompts, every third heldout
SEEDS = 2


def expected_counts(table: ActionTable) -> TransitionCounts:
    """What the conversion must produce, counted from the synthetic store's recipe: one
    transition per recorded action, a branch's entry action from its parent's row, and one
    single-step stop at every non-final point where stop is legal (warm-up excluded)."""
    acts: Counter[str] = Counter()
    cf = episodes = 0

    def path(points: list[int], actions: list[int]) -> None:
        nonlocal cf, episodes
        acts.update(table.names[a] for a in actions)
        legal = table.mask(np.array(points[:-1]), np.zeros(len(points) - 1, np.int64))
        cf += int(legal[:, table.stop].sum())
        episodes += 1 + int(legal[:, table.stop].sum())

    for p in TRAIN_PROMPTS:
        for s in range(SEEDS):
            r = p * SEEDS + s
            points, actions = root_path(table, ROOT_PATTERNS[r % len(ROOT_PATTERNS)])
            path(points, actions)
            if BRANCH_STEP in points[:-1]:
                j = points.index(BRANCH_STEP)
                own = actions[j]
                b = table.refine if (r // 3) % 2 == 0 else min(a for a in table.jumps if a != own)
                acts[table.names[b]] += 1
                path(*continuation(table, int(table.target(BRANCH_STEP, b))))
    finals = len([n for n in acts.elements() if n == "stop"])
    acts["stop"] += cf
    return TransitionCounts(
        actions={n: acts[n] for n in table.names if acts[n]},
        stop_final=finals,
        stop_counterfactual=cf,
        episodes=episodes,
    )


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
    table = _table(dataset)
    want = expected_counts(table)
    got = transition_counts(every, table)
    assert got == want
    assert set(got.actions) >= {"jump-1", "jump-2", "stop", "refine"}  # branches of both kinds
    train, val = to_replay_buffers(dataset, rewards, val_fraction=0.25, seed=0)
    total = sum(want.actions.values())
    assert train.transition_count + val.transition_count == total
    val_prompt = prompt_val_split(np.array([0, 1, 3, 4]), 0.25, 0)
    assert len(val_prompt) == 1
    val_eps = by_prompt[val_prompt.pop()]
    assert sum(e.transition_count for e in val_eps) == val.transition_count
    info = train.dataset_info
    assert info.action_size == table.n and info.action_space.name == "DISCRETE"
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
