"""Run one method over (prompt, seed) pairs on a :class:`StepwiseSampler`, batched.

:func:`rollout` is the one decision loop (eval, ``addiffusion generate`` and the drop-in pipeline
all run it). Episodes of one batch may stop at different points: after each decision the whole
batch's actions go to :meth:`StepwiseSampler.apply` (stops end with the decoded x̂0 of their
point; jumps and refines move and are evaluated together), and the still-running ones decide
again.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from addiffusion.diffusion.actions import ActionTable
from addiffusion.diffusion.sampler import Episode, StepwiseSampler
from addiffusion.eval.policies import EpisodicPolicy, Policy


@dataclass(frozen=True)
class MethodRun:
    """Outcome of one method on N (prompt, seed) pairs, in the order they were given."""

    nfe: np.ndarray  # (N,) int, denoiser evaluations per image
    stop_step: np.ndarray  # (N,) int, grid point whose x̂0 became the final image
    refines: np.ndarray  # (N,) int
    components: dict[str, np.ndarray]  # name -> (N,) float, raw components of the final image
    images: np.ndarray  # (N, H, W, 3) uint8, final images
    masked_actions: int  # policy actions outside the mask that evaluation replaced
    seconds: float  # wall time of the whole run

    @property
    def seconds_per_image(self) -> float:
        return self.seconds / max(len(self.nfe), 1)


def legal_or_fallback(
    actions: np.ndarray, mask: np.ndarray, table: ActionTable
) -> tuple[np.ndarray, int]:
    """Replace illegal actions (jump-1 if legal, else stop); return them and how many."""
    ok = mask[np.arange(len(actions)), actions]
    one = table.jump(1)
    fallback = np.where(mask[:, one], one, table.stop)
    return np.where(ok, actions, fallback), int((~ok).sum())


def _check_actions(raw: object, n: int, name: str, table: ActionTable) -> np.ndarray:
    actions = np.asarray(raw)
    if actions.shape != (n,) or not np.issubdtype(actions.dtype, np.integer):
        raise ValueError(
            f"policy {name!r}.act must return ({n},) integer actions, got shape "
            f"{actions.shape} dtype {actions.dtype}"
        )
    bad = (actions < 0) | (actions >= table.n)
    if bad.any():
        raise ValueError(
            f"policy {name!r} returned action {int(actions[bad][0])}; expected one of "
            f"{dict(enumerate(table.names))}"
        )
    return actions.astype(np.int64)


Decision = Callable[[list[int], np.ndarray, list[Episode]], None]
"""``(batch positions, actions (B,), episodes at their decision point)``, before the actions run."""


@dataclass(frozen=True)
class Rollout:
    """How a batch of started episodes ended (lists in batch order)."""

    components: list[dict[str, float]]  # raw components of each final image
    images: list[np.ndarray]  # (H, W, 3) uint8 final images
    finished: list[float]  # time.perf_counter() when each episode's image was ready
    masked_actions: int  # policy actions outside the mask that were replaced


def rollout(
    sampler: StepwiseSampler,
    policy: Policy | EpisodicPolicy,
    episodes: Sequence[Episode],
    name: str = "policy",
    on_decision: Decision | None = None,
) -> Rollout:
    """Drive started episodes (:meth:`StepwiseSampler.start`) to their ends under ``policy``.

    The one decision loop: eval, ``addiffusion generate`` and the drop-in pipeline all run it.
    """
    episodic = isinstance(policy, EpisodicPolicy)
    if episodic:
        policy.begin(len(episodes))
    finals: dict[int, dict[str, float]] = {}
    images: dict[int, np.ndarray] = {}
    finished: dict[int, float] = {}
    masked = 0
    active = list(range(len(episodes)))
    while active:
        eps = [episodes[i] for i in active]
        mask = sampler.action_masks(eps)
        obs = sampler.observations(eps) if sampler.observe else None
        if episodic:
            raw = policy.act_episodes(np.array(active, np.int64), obs, mask.copy(), eps)
        else:
            raw = policy.act(obs, mask.copy())
        actions, n_bad = legal_or_fallback(
            _check_actions(raw, len(eps), name, sampler.table), mask, sampler.table
        )
        masked += n_bad
        if on_decision is not None:
            on_decision(list(active), actions, eps)
        out = sampler.apply(eps, actions)
        now = time.perf_counter()
        for pos, image in zip(out.stopped, out.images, strict=True):
            i = active[pos]
            finals[i] = dict(episodes[i].components)
            images[i] = image
            finished[i] = now
        active = [active[pos] for pos in out.moved]
    order = range(len(episodes))
    return Rollout(
        [finals[i] for i in order],
        [images[i] for i in order],
        [finished[i] for i in order],
        masked,
    )


def run_method(
    sampler: StepwiseSampler,
    policy: Policy | EpisodicPolicy,
    prompts: Sequence[str],
    seeds: Sequence[int],
    batch_size: int,
    name: str = "policy",
    on_batch: Callable[[int], None] | None = None,
) -> MethodRun:
    """Run ``policy`` on every (prompt, seed) pair with the sampler's masks.

    ``on_batch(n)`` is called after each batch of n episodes (progress bars).
    """
    tic = time.perf_counter()
    nfe, steps, refines, comps, images = [], [], [], [], []
    masked = 0
    for j in range(0, len(prompts), batch_size):
        eps, _ = sampler.start(prompts[j : j + batch_size], seeds[j : j + batch_size])
        done = rollout(sampler, policy, eps, name)
        masked += done.masked_actions
        nfe += [ep.nfe for ep in eps]
        steps += [ep.step for ep in eps]
        refines += [ep.refines_used for ep in eps]
        comps += done.components
        images += done.images
        if on_batch is not None:
            on_batch(len(eps))
    names = sampler.component_names
    return MethodRun(
        nfe=np.array(nfe, np.int64),
        stop_step=np.array(steps, np.int64),
        refines=np.array(refines, np.int64),
        components={k: np.array([c[k] for c in comps], np.float64) for k in names},
        images=np.stack(images),
        masked_actions=masked,
        seconds=time.perf_counter() - tic,
    )
