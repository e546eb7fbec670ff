"""Combine raw reward components into rewards. Pure numpy: used by relabel (vectorised over
millions of steps), by the online env (one step at a time) and by evaluation.

With Q_i = Σ_k w_k · norm_k(c_k[i]) the quality of x̂0 at step i:

* continue from i:  r = Q_{i+1} − Q_i − c_nfe · ΔNFE
* refine from i:    r = Q_{i+1} − Q_i − c_nfe · ΔNFE   (ΔNFE = k)
* stop at i:        r = terminal_bonus · Q_i

so the return of an episode that stops at j is Q_j − Q_0 − c_nfe·(NFE_j − NFE_0) + bonus·Q_j.
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from addiffusion.rewards.config import RewardConfig


def component_stats(components: Mapping[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Mean and std of each component, as recorded in ``meta/info.json``."""
    stats = {}
    for name, values in components.items():
        v = np.asarray(values, dtype=np.float64)
        v = v[np.isfinite(v)]
        std = float(v.std()) if v.size else 1.0
        stats[name] = {
            "mean": float(v.mean()) if v.size else 0.0,
            "std": std if std > 1e-8 else 1.0,
        }
    return stats


def quality(
    components: Mapping[str, np.ndarray],
    cfg: RewardConfig,
    stats: Mapping[str, Mapping[str, float]] | None = None,
) -> np.ndarray:
    """Q for each row: ``(N,)`` float64 from components ``{name: (N,)}``."""
    missing = sorted(set(cfg.weights) - set(components))
    if missing:
        raise KeyError(
            f"rewards.weights names component {missing[0]!r}, which the data does not have "
            f"(available: {', '.join(sorted(components))})"
        )
    if cfg.normalize and stats is None:
        raise ValueError("rewards.normalize is true but no normalisation stats were given")
    total: np.ndarray | float = 0.0
    for name, w in cfg.weights.items():
        v = np.asarray(components[name], dtype=np.float64)
        if cfg.normalize:
            assert stats is not None
            if name not in stats:
                raise KeyError(f"no normalisation stats for component {name!r}")
            v = (v - stats[name]["mean"]) / stats[name]["std"]
        total = total + w * v
    return np.asarray(total, dtype=np.float64)


def step_reward(
    q_now: np.ndarray, q_next: np.ndarray, delta_nfe: np.ndarray, cfg: RewardConfig
) -> np.ndarray:
    """Reward of a non-terminal transition (continue or refine)."""
    return (np.asarray(q_next) - np.asarray(q_now) - cfg.c_nfe * np.asarray(delta_nfe)).astype(
        np.float32
    )


def stop_reward(q_now: np.ndarray, cfg: RewardConfig) -> np.ndarray:
    """Reward of stopping (terminal): the bonus on the final image's quality."""
    return (cfg.terminal_bonus * np.asarray(q_now)).astype(np.float32)
