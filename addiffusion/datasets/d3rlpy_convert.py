"""Convert a built dataset + a rewards file (``datasets relabel``) into d3rlpy replay buffers.

Per trajectory (a root, or a refine branch) of the train split:

* the trajectory itself is one d3rlpy ``Episode``: continue transitions (reward ``r_continue``)
  and, at its last step, STOP with ``r_stop`` (terminal). A branch episode starts with the
  parent's state at ``branch_step`` and action REFINE (reward ``r_enter``), then its own steps;
* every other step where stop is legal (``mdp.action_mask``: not in warm-up) adds a
  counterfactual one-step terminal episode ``(s_i, STOP, r_stop_i)``.

d3rlpy (``BasicTransitionPicker``) gives a terminated episode of size T exactly T transitions, the
last with ``terminal=1`` and a zero next observation, so a one-step terminal episode is one
transition whose target is just its reward. Train and validation are split *by prompt_id*.
"""

from __future__ import annotations

import json
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import polars as pl
import zarr
from d3rlpy.constants import ActionSpace
from d3rlpy.dataset import Episode, EpisodeBase, InfiniteBuffer, ReplayBuffer, Signature

from addiffusion.datasets.build import prompt_val_split
from addiffusion.datasets.relabel import info_sha256, read_info, scan_table
from addiffusion.diffusion import mdp


@dataclass(frozen=True)
class TransitionCounts:
    """Transitions of each kind in a list of converted episodes."""

    continue_: int
    stop_final: int
    """STOP at a trajectory's last step (end of schedule)."""
    stop_counterfactual: int
    refine: int
    episodes: int


def _read_rows(arr: zarr.Array, rows: np.ndarray) -> np.ndarray:
    """``arr[rows]`` reading only the chunks needed (rows may repeat, any order)."""
    uniq, inverse = np.unique(rows, return_inverse=True)
    if uniq.size == 0:
        return np.zeros((0, *arr.shape[1:]), dtype=arr.dtype)
    data = np.asarray(arr.get_orthogonal_selection((uniq,)))
    return data[inverse]


def load_steps(dataset_dir: Path, rewards_path: Path, split: str = "train") -> pl.DataFrame:
    """Steps of ``split`` joined with their episode and rewards, sorted (episode_id, step)."""
    dataset_dir, rewards_path = Path(dataset_dir), Path(rewards_path)
    summary = rewards_path.with_suffix(".json")
    if summary.is_file():
        recorded = json.loads(summary.read_text()).get("dataset_info_sha256")
        if recorded and recorded != info_sha256(dataset_dir):
            raise ValueError(
                f"{rewards_path} was relabelled from another dataset than "
                f"{dataset_dir} (meta/info.json sha256 differs); re-run relabel"
            )
    episodes = (
        scan_table(dataset_dir, "episodes")
        .filter(pl.col("split") == split)
        .select("episode_id", "prompt_id", "parent_episode_id", "branch_step", "text_row")
        .collect()
    )
    steps = scan_table(dataset_dir, "steps").collect().join(episodes, on="episode_id", how="inner")
    rewards = pl.read_parquet(rewards_path)
    joined = steps.join(rewards, on=["episode_id", "step"], how="left").sort("episode_id", "step")
    missing = joined.filter(pl.col("r_stop").is_null())
    if missing.height:
        r = missing.row(0, named=True)
        raise ValueError(
            f"{rewards_path} has no row for episode {r['episode_id']!r} step "
            f"{r['step']} of {dataset_dir}; re-run `addiffusion datasets relabel`"
        )
    return joined


def observations(dataset_dir: Path, steps: pl.DataFrame, info: dict) -> np.ndarray:
    """(N, layout.dim) float32 observations of the rows of ``steps`` (see :func:`load_steps`)."""
    for c in ("clip_score", "stability"):
        if c not in steps.columns:
            raise KeyError(
                f"{dataset_dir} records no {c!r} component, which the observation's "
                f"quality vector needs (components: {info.get('components')})"
            )
    group = zarr.open_group(Path(dataset_dir) / "features.zarr", mode="r", zarr_format=3)
    image = _read_rows(group["image_features"], steps["feature_row"].to_numpy())
    text = _read_rows(group["text_features"], steps["text_row"].to_numpy())
    clip = steps["clip_score"].to_numpy().astype(np.float64)
    # Delta vs the previous x̂0: the previous step of the episode, or for a branch's first
    # step the parent's step it left from; 0 at a root's step 0.
    prev = steps.select(
        pl.when(pl.col("episode_id") == pl.col("episode_id").shift(1))
        .then(pl.col("clip_score").shift(1))
        .otherwise(None)
        .alias("prev"),
        "parent_episode_id",
        "branch_step",
        "episode_id",
        "step",
    )
    parent_clip = steps.select(
        pl.col("episode_id").alias("parent_episode_id"),
        pl.col("step").alias("branch_step"),
        pl.col("clip_score").alias("parent_clip"),
    )
    prev = prev.join(
        parent_clip, on=["parent_episode_id", "branch_step"], how="left", maintain_order="left"
    )
    prev_clip = prev["prev"].fill_null(prev["parent_clip"]).to_numpy().astype(np.float64)
    delta = np.where(np.isnan(prev_clip), 0.0, clip - np.nan_to_num(prev_clip))
    return mdp.build_observations(
        image,
        text,
        steps["t_frac"].to_numpy(),
        steps["step"].to_numpy(),
        int(info["sampler"]["n_max"]),
        clip,
        delta,
        steps["stability"].to_numpy(),
        steps["nfe"].to_numpy(),
        steps["refines_used"].to_numpy(),
    )


def _episode(obs: np.ndarray, actions: list[int], rewards: np.ndarray, terminated: bool) -> Episode:
    return Episode(
        observations=np.ascontiguousarray(obs, dtype=np.float32),
        actions=np.asarray(actions, dtype=np.int64).reshape(-1, 1),
        rewards=np.asarray(rewards, dtype=np.float32).reshape(-1, 1),
        terminated=terminated,
    )


def build_episodes(
    dataset_dir: Path, rewards_path: Path, split: str = "train"
) -> dict[int, list[EpisodeBase]]:
    """d3rlpy episodes of ``split`` grouped by prompt_id (see module docstring)."""
    info = read_info(dataset_dir)
    s = info["sampler"]
    steps = load_steps(dataset_dir, rewards_path, split)
    obs = observations(dataset_dir, steps, info)
    legal_stop = mdp.action_mask(
        steps["step"].to_numpy(),
        int(s["n_max"]),
        int(s["warmup"]),
        steps["refines_used"].to_numpy(),
        int(s["refine_budget"]),
    )[:, mdp.STOP]
    step_no = steps["step"].to_numpy()
    r_cont = steps["r_continue"].to_numpy()
    r_stop = steps["r_stop"].to_numpy()
    r_enter = steps["r_enter"].to_numpy()
    out: dict[int, list[EpisodeBase]] = {}
    bounds = (
        steps.with_row_index("_i")
        .group_by("episode_id", maintain_order=True)
        .agg(
            pl.col("_i").first().alias("lo"),
            pl.col("_i").last().alias("hi"),
            pl.col("prompt_id").first(),
            pl.col("parent_episode_id").first(),
            pl.col("branch_step").first(),
            pl.col("action").last().alias("last_action"),
        )
    )
    start_of = dict(zip(bounds["episode_id"].to_list(), bounds["lo"].to_list(), strict=True))
    for ep in bounds.iter_rows(named=True):
        lo, hi = int(ep["lo"]), int(ep["hi"])
        eps = out.setdefault(int(ep["prompt_id"]), [])
        terminated = int(ep["last_action"]) == mdp.STOP
        rows = list(range(lo, hi + 1))
        actions = [mdp.CONTINUE] * (hi - lo) + [mdp.STOP]
        rewards = [*np.nan_to_num(r_cont[lo:hi]), r_stop[hi] if terminated else 0.0]
        if ep["parent_episode_id"] is not None:
            p0 = start_of.get(ep["parent_episode_id"])
            parent = None if p0 is None else int(p0 + ep["branch_step"] - step_no[p0])
            if parent is not None and not np.isnan(r_enter[lo]):
                rows, actions = [parent, *rows], [mdp.REFINE, *actions]
                rewards = [r_enter[lo], *rewards]
        if len(rows) > 1 or terminated:
            eps.append(_episode(obs[rows], actions, np.asarray(rewards), terminated))
        for i in range(lo, hi + 1):
            if (i != hi or not terminated) and legal_stop[i]:
                eps.append(_episode(obs[i : i + 1], [mdp.STOP], np.asarray([r_stop[i]]), True))
    return out


def make_buffer(episodes: list[EpisodeBase], obs_dim: int) -> ReplayBuffer:
    """An infinite d3rlpy buffer with the signatures and the discrete action space explicit
    (an empty episode list is allowed, e.g. no validation prompts)."""
    return ReplayBuffer(
        InfiniteBuffer(),
        episodes=episodes,
        observation_signature=Signature(dtype=[np.dtype(np.float32)], shape=[(obs_dim,)]),
        action_signature=Signature(dtype=[np.dtype(np.int64)], shape=[(1,)]),
        reward_signature=Signature(dtype=[np.dtype(np.float32)], shape=[(1,)]),
        action_space=ActionSpace.DISCRETE,
        action_size=mdp.N_ACTIONS,
    )


def to_replay_buffers(
    dataset_dir: Path, rewards_path: Path, val_fraction: float, seed: int
) -> tuple[ReplayBuffer, ReplayBuffer]:
    """(train, validation) buffers from the train split, validation prompts chosen by
    :func:`addiffusion.datasets.build.prompt_val_split`. Observations: (layout.dim,) float32."""
    by_prompt = build_episodes(Path(dataset_dir), Path(rewards_path), "train")
    if not by_prompt:
        raise ValueError(f"{dataset_dir} has no train-split steps to convert")
    val_ids = prompt_val_split(np.asarray(sorted(by_prompt)), val_fraction, seed)
    dim = int(read_info(dataset_dir)["observation"]["dim"])
    train = [e for p, eps in sorted(by_prompt.items()) if p not in val_ids for e in eps]
    val = [e for p, eps in sorted(by_prompt.items()) if p in val_ids for e in eps]
    return make_buffer(train, dim), make_buffer(val, dim)


def transition_counts(episodes: list[EpisodeBase]) -> TransitionCounts:
    """Count transitions by kind as d3rlpy will sample them (``episode.transition_count``)."""
    c: Counter[str] = Counter()
    for ep in episodes:
        acts = np.asarray(ep.actions).reshape(-1)[: ep.transition_count]
        for a in acts:
            if a == mdp.CONTINUE:
                c["continue_"] += 1
            elif a == mdp.REFINE:
                c["refine"] += 1
            elif ep.size() == 1:
                c["stop_counterfactual"] += 1
            else:
                c["stop_final"] += 1
    return TransitionCounts(
        continue_=c["continue_"],
        stop_final=c["stop_final"],
        stop_counterfactual=c["stop_counterfactual"],
        refine=c["refine"],
        episodes=len(episodes),
    )
