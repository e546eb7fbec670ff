"""DiscreteIQL as a d3rlpy algorithm: fit, .d3 round trip through d3rlpy.load_learnable."""

from __future__ import annotations

from pathlib import Path

import d3rlpy
import numpy as np
import pytest
import torch
from d3rlpy.logging import NoopAdapterFactory
from d3rlpy.models.encoders import VectorEncoderFactory
from offline_rl_stop_mdp import OBS_DIM, make_buffer

from addiffusion.offline_rl.discrete_iql import DiscreteIQL, DiscreteIQLConfig

torch.set_num_threads(1)


def _tiny_iql(**kwargs: object) -> DiscreteIQL:
    enc = VectorEncoderFactory(hidden_units=[16])
    return DiscreteIQLConfig(
        batch_size=32,
        actor_encoder_factory=enc,
        critic_encoder_factory=enc,
        value_encoder_factory=enc,
        **kwargs,
    ).create(device="cpu:0")


def test_fit_save_load_learnable_round_trip(tmp_path: Path) -> None:
    d3rlpy.seed(0)
    algo = _tiny_iql()
    history = algo.fit(
        make_buffer(6, seed=0),
        n_steps=40,
        n_steps_per_epoch=20,
        logger_adapter=NoopAdapterFactory(),
        show_progress=False,
    )
    assert len(history) == 2
    assert {"q_loss", "v_loss", "actor_loss", "mean_weight"} <= set(history[-1][1])
    algo.save(str(tmp_path / "policy.d3"))

    loaded = d3rlpy.load_learnable(str(tmp_path / "policy.d3"))
    assert isinstance(loaded, DiscreteIQL)
    assert loaded.config.get_type() == "discrete_iql"
    obs = np.random.default_rng(0).normal(size=(64, OBS_DIM)).astype(np.float32)
    np.testing.assert_array_equal(loaded.predict(obs), algo.predict(obs))
    for a in range(3):
        actions = np.full(64, a)
        np.testing.assert_allclose(
            loaded.predict_value(obs, actions), algo.predict_value(obs, actions), rtol=1e-6
        )
    # The checkpoint holds the optimizers made by the config's factories (Adam moments).
    assert loaded.impl is not None and algo.impl is not None
    assert loaded.impl.policy_optim.state_dict()["state"]
    assert loaded.impl.q_function_optim.state_dict()["state"]
    # predict is the greedy action of the categorical policy, not of Q.
    with torch.no_grad():
        logits = algo.impl.policy(torch.from_numpy(obs)).logits.numpy()
    np.testing.assert_array_equal(algo.predict(obs), logits.argmax(axis=1))


def test_compile_graph_is_refused() -> None:
    algo = _tiny_iql(compile_graph=True)
    with pytest.raises(ValueError, match="compile_graph"):
        algo.create_impl((OBS_DIM,), 3)
