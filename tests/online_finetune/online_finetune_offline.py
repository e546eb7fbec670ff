"""A real (tiny) offline run for the online_finetune tests (a unique module name, so that it
cannot clash with other test folders' helpers)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
from d3rlpy.constants import ActionSpace
from d3rlpy.dataset import MDPDataset
from online_finetune_consts import OBS_DIM

from addiffusion.diffusion.actions import ActionTable
from addiffusion.diffusion.mdp import ObservationLayout, drop_parts
from addiffusion.offline_rl.config import OfflineRLConfig
from addiffusion.offline_rl.train import train_offline

LAYOUT = ObservationLayout(image_dim=32, text_dim=32)
"""The tiny CLIP's observation layout (OBS_DIM columns)."""


def train_tiny_offline(out: Path, table: ActionTable, data_seed: int = 0, **cfg: Any) -> Path:
    """A real DiscreteIQL run (2 gradient steps, hidden [16, 16]) on random transitions of the
    env's obs dim over ``table``, written to ``out``; ``cfg``: more OfflineRLConfig fields (e.g.
    ``seeds``, ``action_space``, ``drop_observations``: the data then holds only the allowed
    actions and zeros in the dropped columns, as the offline stage's conversion makes them)."""
    settings: dict[str, Any] = {
        "n_steps": 2,
        "n_steps_per_epoch": 2,
        "hidden_units": [16, 16],
        "device": "cpu",
        "iql": {**OfflineRLConfig().iql, "batch_size": 8},
        **cfg,
    }
    config = OfflineRLConfig(**settings)
    allowed = table.allowed(config.action_space)
    rng = np.random.default_rng(data_seed)
    n = 32
    terminals = np.zeros(n)
    terminals[3::4] = 1.0
    obs = rng.standard_normal((n, OBS_DIM)).astype(np.float32) * 0.3 + 0.1
    data = MDPDataset(
        drop_parts(obs, LAYOUT, config.drop_observations),
        rng.choice([a for a in [*table.jumps, table.stop] if allowed[a]], n),
        rng.standard_normal(n).astype(np.float32),
        terminals,
        action_space=ActionSpace.DISCRETE,
        action_size=table.n,
    )
    train_offline(data, None, config, out, log=False, actions=table, layout=LAYOUT)
    return out
