"""The action table: ids, costs, legality, targets and its strict round trip."""

from __future__ import annotations

import numpy as np
import pytest

from addiffusion.diffusion.actions import ACTION_SPACES, ActionTable

TABLE = ActionTable.build([1, 2, 4, 8], n_max=16, warmup=1, refine_budget=1, refine_k=2)


def test_ids_names_and_costs_derive_from_the_rows() -> None:
    assert TABLE.names == ("jump-1", "jump-2", "jump-4", "jump-8", "stop", "refine")
    assert TABLE.n == 6 and TABLE.stop == 4 and TABLE.refine == 5
    assert TABLE.jumps == (0, 1, 2, 3) and TABLE.strides == (1, 2, 4, 8)
    assert TABLE.nfe_cost.tolist() == [1, 1, 1, 1, 0, 3]
    assert TABLE.jump(4) == 2


def test_legality_warmup_last_point_and_budget() -> None:
    mask = TABLE.mask(np.arange(16), np.zeros(16, int))
    assert mask.shape == (16, 6)
    # Warm-up: jumps only.
    assert mask[0].tolist() == [True, True, True, True, False, False]
    # Inside: everything.
    assert mask[5].all()
    # The last point allows only stop.
    assert mask[15].tolist() == [False, False, False, False, True, False]
    # Budget spent: no refine.
    assert not TABLE.mask(5, 1)[TABLE.refine]
    assert not TABLE.mask(5, 0, refine_budget=0)[TABLE.refine]


def test_strides_past_the_end_land_on_the_last_point() -> None:
    assert TABLE.target(0, TABLE.jump(8)) == 8
    assert TABLE.target(12, TABLE.jump(8)) == 15
    assert TABLE.target(7, TABLE.refine) == 8
    assert TABLE.target(7, TABLE.stop) == 7
    assert TABLE.target(np.array([0, 14]), np.array([3, 1])).tolist() == [8, 15]


def test_every_fixed_schedule_dividing_n_max_is_a_legal_path() -> None:
    for k in (1, 2, 4, 8, 16):
        s = 16 // k
        points = list(range(0, 16, s))
        assert len(points) == k
        if points[-1] >= TABLE.warmup:  # stop at the path's last point must be legal
            assert TABLE.mask(points[-1])[TABLE.stop]
        for p in points[:-1]:
            assert TABLE.mask(p)[TABLE.jump(s)] and TABLE.target(p, TABLE.jump(s)) == p + s


def test_round_trip_and_strict_reader() -> None:
    assert ActionTable.from_dict(TABLE.to_dict()) == TABLE
    bad = TABLE.to_dict()
    bad["actions"][1]["id"] = 7
    with pytest.raises(ValueError, match=r"actions\[1\] must have id 1"):
        ActionTable.from_dict(bad, "info['actions']")
    missing = TABLE.to_dict()
    del missing["n_max"]
    with pytest.raises(ValueError, match="has no 'n_max'"):
        ActionTable.from_dict(missing)


def test_build_rejects_strides_without_one() -> None:
    with pytest.raises(ValueError, match="must include 1"):
        ActionTable.build([2, 4], 16, 1, 0, 2)


def test_action_space_ablations() -> None:
    names = np.array(TABLE.names)
    assert names[TABLE.allowed("stop_only")].tolist() == ["jump-1", "stop"]
    assert names[TABLE.allowed("jumps")].tolist() == [
        "jump-1",
        "jump-2",
        "jump-4",
        "jump-8",
        "stop",
    ]
    assert TABLE.allowed("jumps_refine").all()
    for space in ACTION_SPACES:
        allowed = TABLE.allowed(space)
        assert allowed.shape == (TABLE.n,) and allowed.dtype == bool
        assert allowed[TABLE.stop] and allowed[TABLE.jump(1)]  # every space can finish a path
    # A reuse action (tables built with reuse) belongs to the whole space only.
    reuse = ActionTable.build([1, 2], 8, 1, refine_budget=1, refine_k=2, reuse=True)
    assert not reuse.allowed("jumps")[reuse.reuse] and reuse.allowed("jumps_refine")[reuse.reuse]
    assert np.array(reuse.names)[reuse.allowed("stop_only")].tolist() == ["jump-1", "stop"]
    with pytest.raises(ValueError, match="unknown action space 'refine_only'"):
        TABLE.allowed("refine_only")
