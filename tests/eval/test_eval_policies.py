"""The heuristics' decision rules on hand-made observations (only the quality block is read)."""

from __future__ import annotations

import numpy as np

from addiffusion.diffusion import mdp
from addiffusion.diffusion.actions import ActionTable
from addiffusion.eval.policies import EpisodicPolicy, PatienceStop, ProgressStride

TABLE = ActionTable.build([1, 2, 4], 8, 1, 0, 2)


def obs(**fields: list[float]) -> np.ndarray:
    """(B, 3 + quality) observations with the given quality fields (others 0)."""
    n = len(next(iter(fields.values())))
    q = np.zeros((n, len(mdp.QUALITY_FIELDS)), np.float32)
    for name, values in fields.items():
        q[:, mdp.QUALITY_FIELDS.index(name)] = values
    return np.concatenate([np.zeros((n, 3), np.float32), q], axis=1)


def test_progress_stride_takes_the_longest_jump_within_tolerance() -> None:
    p = ProgressStride(0.1, TABLE)
    mask = TABLE.mask(np.array([2, 2, 2, 2, 7]))
    # change 1 - stability: 0.5 (nothing fits: jump-1), 0.04 (2 fits), 0.02 (4 fits), 0, last.
    got = p.act(obs(stability=[0.5, 0.96, 0.98, 1.0, 1.0]), mask)
    assert [TABLE.names[a] for a in got] == ["jump-1", "jump-2", "jump-4", "jump-4", "stop"]


def test_patience_stop_counts_points_without_gain_per_episode() -> None:
    p = PatienceStop(min_gain=0.01, patience=2, table=TABLE)
    assert isinstance(p, EpisodicPolicy)
    p.begin(2)
    mask = TABLE.mask(np.array([1, 1]))
    names = lambda a: [TABLE.names[i] for i in a]  # noqa: E731
    # Episode 0 keeps improving; episode 1 stalls after its first point.
    assert names(p.act_episodes(np.array([0, 1]), obs(clip_score=[0.1, 0.3]), mask, ())) == [
        "jump-1",
        "jump-1",
    ]
    assert names(p.act_episodes(np.array([0, 1]), obs(clip_score=[0.2, 0.305]), mask, ())) == [
        "jump-1",
        "jump-1",
    ]
    assert names(p.act_episodes(np.array([0, 1]), obs(clip_score=[0.3, 0.30]), mask, ())) == [
        "jump-1",
        "stop",
    ]
    # Episode 1 dropped out: the rows now are episode 0 only, its memory intact.
    assert names(p.act_episodes(np.array([0]), obs(clip_score=[0.305]), mask[:1], ())) == ["jump-1"]
    assert names(p.act_episodes(np.array([0]), obs(clip_score=[0.306]), mask[:1], ())) == ["stop"]
    p.begin(1)  # a new batch forgets
    assert names(p.act_episodes(np.array([0]), obs(clip_score=[0.0]), mask[:1], ())) == ["jump-1"]
