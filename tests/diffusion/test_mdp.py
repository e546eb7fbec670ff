from __future__ import annotations

import numpy as np
import pytest

from addiffusion.diffusion import mdp


def test_observation_layout_matches_builder() -> None:
    layout = mdp.ObservationLayout(image_dim=6, text_dim=4)
    n = 3
    obs = mdp.build_observations(
        image_features=np.ones((n, 6)),
        text_features=np.zeros((n, 4)),
        t_frac=np.linspace(1, 0, n),
        step=np.arange(n),
        n_max=n,
        clip_score=np.full(n, 0.3),
        clip_score_delta=np.zeros(n),
        stability=np.ones(n),
        nfe=np.arange(1, n + 1),
        refines_used=np.zeros(n),
    )
    assert obs.shape == (n, layout.dim) and obs.dtype == np.float32
    quality = obs[:, -layout.quality_dim :]
    np.testing.assert_allclose(quality[:, 0], 0.3, rtol=1e-6)
    np.testing.assert_allclose(quality[:, 3], np.arange(1, n + 1) / n, rtol=1e-6)
    assert mdp.ObservationLayout.from_dict(layout.to_dict()) == layout


def test_observation_parts_columns_and_drop() -> None:
    layout = mdp.ObservationLayout(image_dim=6, text_dim=4)
    t, q = layout.time_dim, layout.quality_dim
    assert mdp.OBSERVATION_PARTS == ("image_features", "text_features", "time", "quality")
    spans = [layout.columns(p) for p in mdp.OBSERVATION_PARTS]
    assert spans == [slice(0, 6), slice(6, 10), slice(10, 10 + t), slice(10 + t, 10 + t + q)]
    assert spans[-1].stop == layout.dim  # the parts tile the vector, in order
    keep = layout.keep_mask(["text_features", "quality"])
    assert keep.shape == (layout.dim,) and keep.dtype == bool
    assert keep.tolist() == [True] * 6 + [False] * 4 + [True] * t + [False] * q
    assert layout.keep_mask([]).all()

    obs = np.random.default_rng(0).normal(size=(3, layout.dim)).astype(np.float32)
    assert mdp.drop_parts(obs, layout, []) is obs  # nothing dropped: no copy
    dropped = mdp.drop_parts(obs, layout, ["time"])
    assert dropped is not obs and dropped.dtype == np.float32
    assert not dropped[:, spans[2]].any()
    kept = layout.keep_mask(["time"])
    np.testing.assert_array_equal(dropped[:, kept], obs[:, kept])
    assert obs[:, spans[2]].any()  # the input is left as it was
    with pytest.raises(ValueError, match="unknown observation part 'colour'"):
        layout.columns("colour")
    with pytest.raises(ValueError, match="unknown observation part"):
        mdp.drop_parts(obs, layout, ["quality", "colour"])
