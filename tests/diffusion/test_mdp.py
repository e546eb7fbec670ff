from __future__ import annotations

import numpy as np

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
