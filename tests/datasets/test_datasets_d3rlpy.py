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


def expected_counts(table: ActionTable, allowed: np.ndarray | None = None) -> TransitionCounts:
    """What the conversion must produce, counted from the synthetic store's recipe: one
    transition per recorded action, a branch's entry action from its parent's row, and one
    single-step stop at every non-final point where stop is legal (warm-up excluded).

    ``allowed``: the action-space ablation. A path is cut at its first other action (the rows
    before it and that row stay: a truncated episode whose transitions are the actions before
    the cut, and a stop at each of those rows where stop is legal); a branch whose parent row
    was cut off or whose entry action is not allowed is left out."""
    ok = np.ones(table.n, bool) if allowed is None else np.asarray(allowed, bool)
    acts: Counter[str] = Counter()
    cf = episodes = finals = 0

    def path(points: list[int], actions: list[int], entered: bool = False) -> int:
        """Count one path; returns how many of its rows are reachable."""
        nonlocal cf, episodes, finals
        cut = next((i for i, a in enumerate(actions) if not ok[a]), None)
        kept = len(points) if cut is None else cut + 1
        stops_at = points[:-1] if cut is None else points[:kept]  # rows with a counterfactual
        acts.update(table.names[a] for a in (actions if cut is None else actions[:cut]))
        legal = table.mask(np.array(stops_at), np.zeros(len(stops_at), np.int64))
        n_cf = int(legal[:, table.stop].sum())
        cf += n_cf
        finals += cut is None
        episodes += int(cut is None or kept + entered > 1) + n_cf
        return kept

    for p in TRAIN_PROMPTS:
        for s in range(SEEDS):
            r = p * SEEDS + s
            points, actions = root_path(table, ROOT_PATTERNS[r % len(ROOT_PATTERNS)])
            kept = path(points, actions)
            if BRANCH_STEP in points[:-1]:
                j = points.index(BRANCH_STEP)
                own = actions[j]
                b = table.refine if (r // 3) % 2 == 0 else min(a for a in table.jumps if a != own)
                if j < kept and ok[b]:
                    acts[table.names[b]] += 1
                    path(*continuation(table, int(table.target(BRANCH_STEP, b))), entered=True)
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


def _episodes(dataset: Path, rewards: Path, **ablation: object) -> list:
    return [e for eps in build_episodes(dataset, rewards, **ablation).values() for e in eps]


def _actions(episode: object) -> list[int]:
    """The actions d3rlpy samples from ``episode`` (its first ``transition_count``)."""
    return np.asarray(episode.actions).reshape(-1)[: episode.transition_count].tolist()


@pytest.mark.parametrize("space", ["stop_only", "jumps"])
def test_action_space_ablation_cuts_paths(dataset: Path, rewards: Path, space: str) -> None:
    table = _table(dataset)
    allowed = table.allowed(space)
    full = transition_counts(_episodes(dataset, rewards), table)
    episodes = _episodes(dataset, rewards, allowed=allowed)
    got = transition_counts(episodes, table)
    assert got == expected_counts(table, allowed)
    # Only the space's actions are ever sampled.
    ok = set(np.flatnonzero(allowed).tolist())
    assert all(set(_actions(e)) <= ok for e in episodes)
    # Fewer transitions of every kind, and none of the actions left out.
    assert sum(got.actions.values()) < sum(full.actions.values())
    assert all(got.actions.get(n, 0) <= full.actions[n] for n in full.actions)
    assert {n for n in got.actions} <= {table.names[a] for a in ok}
    assert got.stop_final < full.stop_final and got.episodes < full.episodes
    # A path cut short is a truncated episode: not terminal, its last sampled action not stop.
    paths = [e for e in episodes if e.size() > 1]
    cut = [e for e in paths if not e.terminated]
    assert all(e.transition_count == e.size() - 1 for e in cut)
    assert all(_actions(e)[-1] != table.stop for e in cut)
    assert all(_actions(e)[-1] == table.stop for e in paths if e.terminated)
    assert len(paths) - len(cut) == got.stop_final
    if space == "stop_only":  # the roots with a stride 2 are cut there
        assert cut and set(got.actions) == {"jump-1", "stop"}
    else:  # only the branches entered by refine go; every other path stays whole
        assert not cut and "refine" not in got.actions and got.actions["jump-2"] > 0
        assert full.stop_final - got.stop_final == full.actions["refine"]
    # Through to_replay_buffers: the split and the buffers follow the same ablation.
    train, val = to_replay_buffers(dataset, rewards, 0.25, 0, allowed=allowed)
    assert train.transition_count + val.transition_count == sum(got.actions.values())


def test_every_action_allowed_is_no_ablation(dataset: Path, rewards: Path) -> None:
    table = _table(dataset)
    assert table.allowed("jumps_refine").all()
    plain = _episodes(dataset, rewards)
    every = _episodes(dataset, rewards, allowed=np.ones(table.n, bool))
    assert len(plain) == len(every)
    for a, b in zip(plain, every, strict=True):
        np.testing.assert_array_equal(a.observations, b.observations)
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.rewards, b.rewards)
        assert a.terminated == b.terminated


def test_dropped_observation_part_is_zeros(dataset: Path, rewards: Path) -> None:
    from addiffusion.diffusion.mdp import ObservationLayout

    layout = ObservationLayout.from_dict(read_info(dataset)["observation"])
    assert layout.quality_dim == 5 and layout.columns("quality") == slice(28, 33)
    plain = _episodes(dataset, rewards)
    dropped = _episodes(dataset, rewards, drop=["quality"])
    assert len(plain) == len(dropped)
    obs = np.concatenate([e.observations for e in plain])
    without = np.concatenate([e.observations for e in dropped])
    assert np.any(obs[:, -5:] != 0)  # there was something to drop
    assert not np.any(without[:, -5:])
    np.testing.assert_array_equal(without[:, :-5], obs[:, :-5])
    for a, b in zip(plain, dropped, strict=True):  # the rest of each episode is untouched
        np.testing.assert_array_equal(a.actions, b.actions)
        np.testing.assert_array_equal(a.rewards, b.rewards)
    # Both ablations at once, through the buffers.
    table = _table(dataset)
    train, _ = to_replay_buffers(
        dataset, rewards, 0.25, 0, allowed=table.allowed("stop_only"), drop=["quality", "time"]
    )
    seen = np.concatenate([e.observations for e in train.episodes])
    assert not np.any(seen[:, ~layout.keep_mask(["quality", "time"])])
    assert np.any(seen[:, layout.columns("image_features")])


def test_bad_ablations_are_refused(dataset: Path, rewards: Path) -> None:
    table = _table(dataset)
    with pytest.raises(ValueError, match=rf"allowed must be \({table.n},\) bool, got shape \(3,\)"):
        build_episodes(dataset, rewards, allowed=np.ones(3, bool))
    with pytest.raises(ValueError, match="allowed must be"):
        build_episodes(dataset, rewards, allowed=np.ones((1, table.n), bool))
    for name in ("stop", "jump-1"):
        allowed = np.ones(table.n, bool)
        allowed[table.names.index(name)] = False
        with pytest.raises(ValueError, match="must allow stop and jump-1"):
            build_episodes(dataset, rewards, allowed=allowed)
    with pytest.raises(ValueError, match="unknown observation part 'colour'"):
        build_episodes(dataset, rewards, drop=["colour"])
