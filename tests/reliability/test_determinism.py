"""Same seed, same data, same CPU: the trained policy's weights are bit-identical (hash equal).
(The collector's side, the same store from the same seed, is tests/reliability/
test_collect_faults.py's; the README's "Collect" section says what may differ across thread
counts and devices.)"""

from __future__ import annotations

import hashlib
from pathlib import Path

import numpy as np
import torch
from d3rlpy.constants import ActionSpace
from d3rlpy.dataset import MDPDataset

from addiffusion.diffusion.actions import ActionTable
from addiffusion.offline_rl.config import FQEParams, OfflineRLConfig
from addiffusion.offline_rl.policy import load_policy
from addiffusion.offline_rl.train import train_offline

TABLE = ActionTable.build([1, 2], 5, 1, refine_budget=0, refine_k=2)


def _buffer() -> MDPDataset:
    rng = np.random.default_rng(0)
    n = 300
    return MDPDataset(
        observations=rng.normal(size=(n, 12)).astype(np.float32),
        actions=rng.integers(0, TABLE.n, n),
        rewards=rng.normal(size=(n, 1)).astype(np.float32),
        terminals=(np.arange(n) % 6 == 5).astype(np.float32),
        action_space=ActionSpace.DISCRETE,
        action_size=TABLE.n,
    )


def _weights_sha256(run: Path) -> str:
    """sha256 over every tensor of the trained modules (policy, Q, V and their targets)."""
    impl = load_policy(run / "policy.d3").algo.impl
    h = hashlib.sha256()
    for name, module in sorted(impl.modules.__dict__.items()):
        if isinstance(module, torch.nn.Module):
            for key, value in sorted(module.state_dict().items()):
                h.update(f"{name}.{key}".encode())
                h.update(value.detach().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


def test_same_seed_same_weights(tmp_path: Path) -> None:
    cfg = OfflineRLConfig(
        algo="iql",
        baselines=["bcq"],
        seeds=[3],
        n_steps=30,
        n_steps_per_epoch=15,  # a checkpoint at step 15 too
        hidden_units=[16],
        device="cpu",
        fqe=FQEParams(n_steps=0),
        iql={**OfflineRLConfig().iql, "batch_size": 32},
        bcq={**OfflineRLConfig().bcq, "batch_size": 32, "target_update_interval": 10},
    )
    for name in ("a", "b"):
        train_offline(_buffer(), None, cfg, tmp_path / name, actions=TABLE, log=False)
    for run in (".", "checkpoints/15", "baselines/bcq", "baselines/bcq/checkpoints/15"):
        assert _weights_sha256(tmp_path / "a" / run) == _weights_sha256(tmp_path / "b" / run), run
    other = cfg.with_seed(4)
    train_offline(_buffer(), None, other, tmp_path / "c", actions=TABLE, log=False)
    assert _weights_sha256(tmp_path / "c") != _weights_sha256(tmp_path / "a")  # the seed matters
