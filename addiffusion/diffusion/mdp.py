"""The MDP's observation vector and NFE convention (its actions: :mod:`addiffusion.diffusion.actions`).

Point ``i`` of an episode is the state after the denoiser has been evaluated at the i-th point
``t_i`` of the fine grid: the one-step clean prediction x̂0_i exists. ``nfe`` counts every
evaluation so far (jumps 1 each, refines k + 1).

NFE convention: one NFE is one denoiser (UNet / transformer) evaluation *per image*, with classifier
-free guidance's conditional and unconditional branches batched into one evaluation and counted
once (the "50 steps = 50 NFE" convention of sampler papers). Used identically everywhere.

Observation (float32, layout recorded in the dataset's ``meta/info.json``)::

    [ image_features (D_img) | text_features (D_txt) | time_embedding (2*E) | quality (5) ]

``quality = [clip_score, clip_score_delta, stability, nfe / n_max, refines_used]``; the time
embedding is sinusoidal of ``t_i / num_train_timesteps`` and of ``i / (n_max - 1)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

QUALITY_FIELDS: tuple[str, ...] = (
    "clip_score",
    "clip_score_delta",
    "stability",
    "nfe_frac",
    "refines_used",
)
TIME_EMBED_DIM = 8  # per scalar; two scalars (t / num_train_timesteps, i / n_max)


def time_embedding(x: np.ndarray, dim: int = TIME_EMBED_DIM) -> np.ndarray:
    """Sinusoidal embedding of values in [0, 1]: ``(N,) -> (N, dim)`` float32."""
    x = np.asarray(x, dtype=np.float64).reshape(-1, 1)
    freqs = np.pi * (2.0 ** np.arange(dim // 2))
    return np.concatenate([np.sin(x * freqs), np.cos(x * freqs)], axis=1).astype(np.float32)


@dataclass(frozen=True)
class ObservationLayout:
    """Where each part of the observation vector lives; stored in ``meta/info.json``."""

    image_dim: int
    text_dim: int
    time_dim: int = 2 * TIME_EMBED_DIM
    quality_dim: int = len(QUALITY_FIELDS)

    @property
    def dim(self) -> int:
        return self.image_dim + self.text_dim + self.time_dim + self.quality_dim

    def to_dict(self) -> dict[str, int]:
        return {**asdict(self), "dim": self.dim}

    @classmethod
    def from_dict(cls, data: dict[str, int]) -> ObservationLayout:
        return cls(data["image_dim"], data["text_dim"], data["time_dim"], data["quality_dim"])

    def columns(self, part: str) -> slice:
        """The columns of one part of the vector: ``image_features``, ``text_features``,
        ``time`` or ``quality`` (:data:`OBSERVATION_PARTS`)."""
        sizes = dict(
            zip(
                OBSERVATION_PARTS,
                (self.image_dim, self.text_dim, self.time_dim, self.quality_dim),
                strict=True,
            )
        )
        if part not in sizes:
            raise ValueError(
                f"unknown observation part {part!r}; expected one of {', '.join(OBSERVATION_PARTS)}"
            )
        start = 0
        for name in OBSERVATION_PARTS:
            if name == part:
                return slice(start, start + sizes[name])
            start += sizes[name]
        raise AssertionError(part)

    def keep_mask(self, drop: Sequence[str]) -> np.ndarray:
        """``(dim,)`` bool, False on the columns of the parts in ``drop``: a policy trained
        without those parts sees them as zeros (:func:`drop_parts`)."""
        keep = np.ones(self.dim, dtype=bool)
        for part in drop:
            keep[self.columns(part)] = False
        return keep


OBSERVATION_PARTS: tuple[str, ...] = ("image_features", "text_features", "time", "quality")
"""The parts of the observation vector, in order (a state ablation drops some of them)."""


def drop_parts(obs: np.ndarray, layout: ObservationLayout, drop: Sequence[str]) -> np.ndarray:
    """``obs`` (N, dim) with the columns of the parts in ``drop`` set to zero (a copy when any
    is dropped): the one rule of a state ablation, applied to the training data and, by the
    policy, to every observation it acts on."""
    if not drop:
        return obs
    out = np.array(obs, dtype=np.float32, copy=True)
    out[:, ~layout.keep_mask(drop)] = 0.0
    return out


def build_observations(
    image_features: np.ndarray,
    text_features: np.ndarray,
    t_frac: np.ndarray,
    step: np.ndarray,
    n_max: int,
    clip_score: np.ndarray,
    clip_score_delta: np.ndarray,
    stability: np.ndarray,
    nfe: np.ndarray,
    refines_used: np.ndarray,
) -> np.ndarray:
    """Stack observations for N steps.

    image_features: (N, D_img), text_features: (N, D_txt) (repeat the episode's row per step),
    t_frac: (N,) timestep / num_train_timesteps in [0, 1], step: (N,) int, the rest (N,).
    Returns (N, layout.dim) float32.
    """
    step = np.asarray(step, dtype=np.float64)
    time = np.concatenate(
        [time_embedding(np.asarray(t_frac)), time_embedding(step / max(n_max - 1, 1))], axis=1
    )
    quality = np.stack(
        [
            np.asarray(clip_score, dtype=np.float32),
            np.asarray(clip_score_delta, dtype=np.float32),
            np.asarray(stability, dtype=np.float32),
            np.asarray(nfe, dtype=np.float32) / float(n_max),
            np.asarray(refines_used, dtype=np.float32),
        ],
        axis=1,
    )
    return np.concatenate(
        [
            np.asarray(image_features, dtype=np.float32),
            np.asarray(text_features, dtype=np.float32),
            time,
            quality,
        ],
        axis=1,
    ).astype(np.float32)
