"""Convert a built dataset + a rewards file (``datasets relabel``) into d3rlpy replay buffers.

Actions are ids of the dataset's action table (``info["actions"]``,
:class:`~addiffusion.diffusion.actions.ActionTable`); ``action_size = table.n``. Per trajectory
(a root, or a branch) of the train split:

* the trajectory itself is one d3rlpy ``Episode``: each row's recorded action (a jump or refine)
  with reward ``r_action`` to the episode's next row and, at its last row, ``stop`` with
  ``r_stop`` (terminal). A branch episode starts with the parent's state at ``branch_step`` and
  action ``branch_action`` (reward ``r_enter``), then its own rows;
* every other row where stop is legal (``table.mask``: not in warm-up) adds a counterfactual
  one-step terminal episode ``(s_i, stop, r_stop_i)``.

d3rlpy (``BasicTransitionPicker``) gives a terminated episode of size T exactly T transitions, the
last with ``terminal=1`` and a zero next observation, so a one-step terminal episode is one
transition whose target is just its reward. Train and validation are split *by prompt_id*.
Rows are related by (episode_id, step) keys (steps are not contiguous).
"""

from __future__ import annotations

import json
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import polars as pl
import zarr
from d3rlpy.constants import ActionSpace
from d3rlpy.dataset import Episode, EpisodeBase, InfiniteBuffer, ReplayBuffer, Signature

from addiffusion.datasets.build import prompt_val_split
from addiffusion.datasets.relabel import info_sha256, scan_table
from addiffusion.diffusion import mdp
from addiffusion.diffusion.actions import ActionTable
from addiffusion.task import read_info


@dataclass(frozen=True)
class TransitionCounts:
    """Transitions of each action (by table name) in a list of converted episodes."""

    actions: dict[str, int] = field(default_factory=dict)
    """Transitions per action name (``stop`` = stop_final + stop_counterfactual)."""
    stop_final: int = 0
    """stop at a trajectory's last row (end of its path)."""
    stop_counterfactual: int = 0
    episodes: int = 0


def dataset_table(dataset_dir: Path) -> ActionTable:
    """The action table the dataset records (``meta/info.json`` ``actions``)."""
    info = read_info(dataset_dir)
    where = f"{Path(dataset_dir) / 'meta' / 'info.json'} 'actions'"
    if "actions" not in info:
        raise ValueError(f"{where} is missing: rebuild the dataset with this version")
    return ActionTable.from_dict(info["actions"], where)


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
        .select(
            "episode_id",
            "prompt_id",
            "parent_episode_id",
            "branch_step",
            "branch_action",
            "text_row",
        )
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
    """(N, layout.dim) float32 observations of the rows of ``steps`` (see :func:`load_steps`:
    sorted by (episode_id, step), with parent_episode_id / branch_step of the row's episode)."""
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
    # Delta vs the previous x̂0: the previous row of the episode (rows are sorted by
    # (episode_id, step)), or for a branch's first row the parent's row at branch_step; 0 at a
    # root's first row.
    same_prev = (steps["episode_id"] == steps["episode_id"].shift(1)).fill_null(False).to_numpy()
    prev_clip = np.where(same_prev, np.roll(clip, 1), np.nan)
    parent_clip = steps.select(
        pl.col("episode_id").alias("parent_episode_id"),
        pl.col("step").cast(pl.Int64).alias("branch_step"),
        pl.col("clip_score").cast(pl.Float64).alias("_parent_clip"),
    )
    from_parent = (
        steps.select("parent_episode_id", pl.col("branch_step").cast(pl.Int64))
        .join(
            parent_clip, on=["parent_episode_id", "branch_step"], how="left", maintain_order="left"
        )["_parent_clip"]
        .to_numpy()
        .astype(np.float64)
    )
    prev_clip = np.where(same_prev, prev_clip, from_parent)
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
    dataset_dir: Path,
    rewards_path: Path,
    split: str = "train",
    allowed: np.ndarray | None = None,
    drop: Sequence[str] = (),
) -> dict[int, list[EpisodeBase]]:
    """d3rlpy episodes of ``split`` grouped by prompt_id (see module docstring).

    Ablations: ``allowed`` ((n,) bool, :meth:`ActionTable.allowed`) keeps only what a policy
    restricted to those actions could reach: a path is cut at its first other action (the rows
    before it stay, as a truncated episode), a branch entered by another action is left out, and
    so are the counterfactual stops of the rows cut. ``drop``: observation parts
    (:data:`addiffusion.diffusion.mdp.OBSERVATION_PARTS`) set to zero (:func:`mdp.drop_parts`).
    """
    info = read_info(dataset_dir)
    table = dataset_table(dataset_dir)
    stop = table.stop
    if allowed is not None and np.asarray(allowed).shape != (table.n,):
        raise ValueError(f"allowed must be ({table.n},) bool, got shape {np.shape(allowed)}")
    ok_action = np.ones(table.n, bool) if allowed is None else np.asarray(allowed, bool)
    if not ok_action[stop] or not ok_action[table.jump(1)]:
        raise ValueError("an action space must allow stop and jump-1")
    steps = load_steps(dataset_dir, rewards_path, split)
    layout = mdp.ObservationLayout.from_dict(info["observation"]) if drop else None
    obs = observations(dataset_dir, steps, info)
    if layout is not None:
        obs = mdp.drop_parts(obs, layout, drop)
    step_no = steps["step"].to_numpy()
    legal_stop = table.mask(step_no, steps["refines_used"].to_numpy())[:, stop]
    recorded = steps["action"].to_numpy().astype(np.int64)
    r_action = steps["r_action"].to_numpy()
    r_stop = steps["r_stop"].to_numpy()
    r_enter = steps["r_enter"].to_numpy()
    # Row index of every (episode_id, step): the parent rows of the branches, by key.
    keys = steps.select("episode_id", pl.col("step").cast(pl.Int64)).with_row_index("_i")
    bounds = (
        steps.with_row_index("_i")
        .group_by("episode_id", maintain_order=True)
        .agg(
            pl.col("_i").first().alias("lo"),
            pl.col("_i").last().alias("hi"),
            pl.col("prompt_id").first(),
            pl.col("parent_episode_id").first(),
            pl.col("branch_step").first().cast(pl.Int64),
            pl.col("branch_action").first(),
            pl.col("action").last().alias("last_action"),
        )
        .join(
            keys.select(
                pl.col("episode_id").alias("parent_episode_id"),
                pl.col("step").alias("branch_step"),
                pl.col("_i").alias("parent_row"),
            ),
            on=["parent_episode_id", "branch_step"],
            how="left",
            maintain_order="left",
        )
    )
    episodes = list(bounds.iter_rows(named=True))
    reach = _reachable(episodes, recorded, ok_action, len(steps))
    out: dict[int, list[EpisodeBase]] = {}
    for ep in episodes:
        lo, hi = int(ep["lo"]), int(ep["hi"])
        eps = out.setdefault(int(ep["prompt_id"]), [])
        if not reach[lo]:
            continue
        # The reachable prefix: a path cut at its first action outside the space ends there.
        end = lo + int(reach[lo : hi + 1].sum()) - 1
        cut = end < hi or not ok_action[recorded[end]]
        terminated = not cut and int(ep["last_action"]) == stop
        rows = list(range(lo, end + 1))
        last = stop if terminated else table.jump(1) if cut else int(recorded[end])
        actions = [*recorded[lo:end].tolist(), last]
        rewards = [*np.nan_to_num(r_action[lo:end]), r_stop[end] if terminated else 0.0]
        parent = ep["parent_row"]
        if ep["parent_episode_id"] is not None and parent is not None and not np.isnan(r_enter[lo]):
            rows = [int(parent), *rows]
            actions = [int(ep["branch_action"]), *actions]
            rewards = [r_enter[lo], *rewards]
        if len(rows) > 1 or terminated:
            eps.append(_episode(obs[rows], actions, np.asarray(rewards), terminated))
        for i in range(lo, end + 1):
            if (i != end or not terminated) and legal_stop[i]:
                eps.append(_episode(obs[i : i + 1], [stop], np.asarray([r_stop[i]]), True))
    return out


def _reachable(
    episodes: list[dict], recorded: np.ndarray, ok_action: np.ndarray, n_rows: int
) -> np.ndarray:
    """(n_rows,) bool: rows a policy taking only ``ok_action`` actions can reach. A root's first
    row is reachable; a branch's first row when its parent row is and its branch action is
    allowed; each next row of a path when the row before is and its recorded action is allowed."""
    reach = np.zeros(n_rows, bool)
    episode_of_row = np.zeros(n_rows, np.int64)
    for k, ep in enumerate(episodes):
        episode_of_row[int(ep["lo"]) : int(ep["hi"]) + 1] = k
    done = np.zeros(len(episodes), bool)
    pending = list(range(len(episodes)))
    while pending:
        later = []
        for k in pending:
            ep = episodes[k]
            lo, hi, parent = int(ep["lo"]), int(ep["hi"]), ep["parent_row"]
            if ep["parent_episode_id"] is None or parent is None:
                start = True
            elif not done[episode_of_row[int(parent)]]:
                later.append(k)  # its parent's path is not settled yet
                continue
            else:
                start = bool(reach[int(parent)]) and bool(ok_action[int(ep["branch_action"])])
            ok = np.concatenate([[start], ok_action[recorded[lo:hi]]])
            reach[lo : hi + 1] = np.logical_and.accumulate(ok)
            done[k] = True
        if len(later) == len(pending):
            raise ValueError("branch episodes whose parents form a cycle")
        pending = later
    return reach


def make_buffer(episodes: list[EpisodeBase], obs_dim: int, action_size: int) -> ReplayBuffer:
    """An infinite d3rlpy buffer with the signatures and the discrete action space explicit
    (``action_size``: the dataset's ``table.n``; an empty episode list is allowed, e.g. no
    validation prompts)."""
    return ReplayBuffer(
        InfiniteBuffer(),
        episodes=episodes,
        observation_signature=Signature(dtype=[np.dtype(np.float32)], shape=[(obs_dim,)]),
        action_signature=Signature(dtype=[np.dtype(np.int64)], shape=[(1,)]),
        reward_signature=Signature(dtype=[np.dtype(np.float32)], shape=[(1,)]),
        action_space=ActionSpace.DISCRETE,
        action_size=action_size,
    )


def to_replay_buffers(
    dataset_dir: Path,
    rewards_path: Path,
    val_fraction: float,
    seed: int,
    allowed: np.ndarray | None = None,
    drop: Sequence[str] = (),
) -> tuple[ReplayBuffer, ReplayBuffer]:
    """(train, validation) buffers from the train split, validation prompts chosen by
    :func:`addiffusion.datasets.build.prompt_val_split`. Observations: (layout.dim,) float32;
    ``action_size``: the dataset's action table's ``n``. ``allowed`` / ``drop``: the
    ablations of :func:`build_episodes`, applied to both buffers."""
    by_prompt = build_episodes(Path(dataset_dir), Path(rewards_path), "train", allowed, drop)
    if not by_prompt:
        raise ValueError(f"{dataset_dir} has no train-split steps to convert")
    text_of = dict(
        scan_table(Path(dataset_dir), "episodes")
        .select("prompt_id", "prompt")
        .unique()
        .collect()
        .iter_rows()
    )
    ids = sorted(by_prompt)
    val_ids = prompt_val_split(np.asarray(ids), val_fraction, seed, [text_of[i] for i in ids])
    dim = int(read_info(dataset_dir)["observation"]["dim"])
    n = dataset_table(dataset_dir).n
    train = [e for p, eps in sorted(by_prompt.items()) if p not in val_ids for e in eps]
    val = [e for p, eps in sorted(by_prompt.items()) if p in val_ids for e in eps]
    return make_buffer(train, dim, n), make_buffer(val, dim, n)


def transition_counts(episodes: list[EpisodeBase], table: ActionTable) -> TransitionCounts:
    """Count transitions by action name as d3rlpy will sample them (``transition_count``)."""
    c: Counter[str] = Counter()
    stop_final = stop_cf = 0
    for ep in episodes:
        acts = np.asarray(ep.actions).reshape(-1)[: ep.transition_count]
        for a in acts.tolist():
            c[table.names[int(a)]] += 1
            if a == table.stop:
                if ep.size() == 1:
                    stop_cf += 1
                else:
                    stop_final += 1
    return TransitionCounts(
        actions={name: c[name] for name in table.names if c[name]},
        stop_final=stop_final,
        stop_counterfactual=stop_cf,
        episodes=len(episodes),
    )
