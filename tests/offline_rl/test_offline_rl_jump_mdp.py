"""IQL on a synthetic jump-MDP whose best schedule is known per prompt type.

Grid of ``N`` points, actions jump-1/2/4, stop (refine off). Quality at the end of any path is
``1 - error``; a jump of stride s adds ``ERROR[type] * (s - 1)`` to the error, and x̂0 at point i
scores ``i / (N - 1) - error``. Each jump costs ``C_NFE`` (one denoiser call). With the real
reward shape (jump: ΔQ - c_nfe, stop: ``BONUS * Q``):

* easy prompts lose nothing by jumping: the best schedule is jump-4, jump-4 (lands on the last
  point), stop: 3 NFE instead of 8;
* hard prompts lose 0.3 per extra stride unit, far more than a call saves: jump-1 to the end.

The behaviour data is the collector's mix: constant-stride roots and per-step random strides,
plus a one-step counterfactual stop at every legal point. IQL (expectile regression in the
support of the data) must learn to jump on the easy type and step on the hard one.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from d3rlpy.constants import ActionSpace
from d3rlpy.dataset import MDPDataset

from addiffusion.diffusion.actions import ActionTable
from addiffusion.offline_rl.config import FQEParams, OfflineRLConfig
from addiffusion.offline_rl.policy import OfflinePolicy, load_policy
from addiffusion.offline_rl.train import train_offline

torch.set_num_threads(1)

N = 8
TABLE = ActionTable.build([1, 2, 4], N, warmup=1, refine_budget=0, refine_k=2)
ERROR = {0: 0.0, 1: 0.3}  # type -> quality lost per extra stride unit (0: easy, 1: hard)
C_NFE, BONUS = 0.1, 1.0


def observe(point: int, kind: int, error: float) -> np.ndarray:
    """Time features, the prompt type (a stand-in for the text features) and x̂0's quality. No
    distractor dimensions: with 200 roots, standardised noise features make the AWR actor
    unreliable (seen while writing this test), which is a data-size question, not a jump one."""
    frac = point / (N - 1)
    onehot = [1.0 - kind, float(kind)]
    return np.array([frac, np.sin(np.pi * frac), *onehot, frac - error, error], np.float32)


def step(point: int, kind: int, error: float, action: int) -> tuple[int, float]:
    stride = TABLE.strides[TABLE.jumps.index(action)]
    return int(TABLE.target(point, action)), error + ERROR[kind] * (stride - 1)


def quality(point: int, error: float) -> float:
    return point / (N - 1) - error


def behaviour_episode(
    kind: int, rng: np.random.Generator, const_stride: int | None
) -> list[tuple[np.ndarray, int, float, bool]]:
    """(obs, action, reward, terminal) transitions of one recorded path and its counterfactual
    stops (each a one-step terminal episode, like the converter writes)."""
    out: list[tuple[np.ndarray, int, float, bool]] = []
    point, error = 0, 0.0
    cfs = []
    while True:
        obs = observe(point, kind, error)
        legal = TABLE.mask(np.array([point]))[0]
        if point == N - 1:
            out.append((obs, TABLE.stop, BONUS * quality(point, error), True))
            break
        if legal[TABLE.stop]:
            cfs.append((obs, TABLE.stop, BONUS * quality(point, error), True))
        jumps = [a for a in TABLE.jumps if legal[a]]
        a = TABLE.jump(const_stride) if const_stride is not None else int(rng.choice(jumps))
        nxt, err = step(point, kind, error, a)
        out.append((obs, a, quality(nxt, err) - quality(point, error) - C_NFE, False))
        point, error = nxt, err
    return [*out, *cfs]


def make_dataset(n_roots: int, seed: int) -> MDPDataset:
    rng = np.random.default_rng(seed)
    rows: list[tuple[np.ndarray, int, float, bool]] = []
    for r in range(n_roots):
        const = [1, 2, 4, None, None][r % 5]  # constant-stride roots and random-stride roots
        rows += behaviour_episode(r % 2, rng, const)
    obs, actions, rewards, terminals = zip(*rows, strict=True)
    return MDPDataset(
        observations=np.stack(obs),
        actions=np.asarray(actions, np.int64),
        rewards=np.asarray(rewards, np.float32).reshape(-1, 1),
        terminals=np.asarray(terminals, np.float32),
        action_space=ActionSpace.DISCRETE,
        action_size=TABLE.n,
    )


@pytest.fixture(scope="module")
def policy(tmp_path_factory: pytest.TempPathFactory) -> OfflinePolicy:
    out = tmp_path_factory.mktemp("jump_mdp")
    cfg = OfflineRLConfig(
        algo="iql",
        baselines=[],
        n_steps=1500,
        n_steps_per_epoch=1500,
        hidden_units=[64, 64],
        device="cpu",
        seeds=[0],
        fqe=FQEParams(n_steps=0),
        iql={
            **OfflineRLConfig().iql,
            "batch_size": 256,
            "actor_learning_rate": 3e-3,
            "critic_learning_rate": 3e-3,
            "tau": 0.05,
            "weight_temp": 10.0,
        },
    )
    train_offline(make_dataset(200, 0), make_dataset(20, 1), cfg, out, actions=TABLE, log=False)
    return load_policy(Path(out) / "policy.d3")


def rollout(policy: OfflinePolicy, kind: int) -> tuple[list[str], int, float]:
    """Greedy masked path of the policy: action names, NFE, final quality."""
    point, error, nfe, names = 0, 0.0, 1, []
    while True:
        mask = TABLE.mask(np.array([point]))
        a = int(policy.act(observe(point, kind, error)[None], mask)[0])
        names.append(TABLE.names[a])
        if a == TABLE.stop:
            return names, nfe, quality(point, error)
        point, error = step(point, kind, error, a)
        nfe += int(TABLE.nfe_cost[a])


def test_iql_jumps_on_easy_prompts_and_steps_on_hard_ones(policy: OfflinePolicy) -> None:
    # Also holds for training seed 1 (one run here: about 10 s).
    easy, easy_nfe, easy_q = rollout(policy, 0)
    hard, hard_nfe, hard_q = rollout(policy, 1)
    # Easy: the 3-NFE schedule (jump-4 twice, the second lands on the last point); full quality.
    assert easy == ["jump-4", "jump-4", "stop"], easy
    assert easy_nfe == 3 and easy_q == pytest.approx(1.0)
    # Hard: every point of the grid, no quality lost.
    assert hard == ["jump-1"] * (N - 1) + ["stop"], hard
    assert hard_nfe == N and hard_q == pytest.approx(1.0)


def test_behaviour_data_covers_every_jump_at_every_point() -> None:
    """The premise of the test above: IQL only picks actions in the data's support."""
    data = make_dataset(200, 0)
    obs = np.concatenate([e.observations for e in data.episodes])
    acts = np.concatenate([np.asarray(e.actions).reshape(-1) for e in data.episodes])
    points = np.rint(obs[:, 0] * (N - 1)).astype(int)
    legal = TABLE.mask(points)
    for p in range(N - 1):
        seen = set(acts[points == p].tolist())
        assert seen == set(np.flatnonzero(legal[np.argmax(points == p)]).tolist()), p
