"""The trajectory store's record schemas (version 1). The contract between collectors, the store
and everything downstream. Change ``SCHEMA_VERSION`` when a column changes meaning.

A *store* is a folder of shards written by collectors; ``datasets build`` merges shards into a
*dataset* folder (``meta/info.json``, chunked Parquet, sharded Zarr, optional WebDataset tars,
dataset card).

Shard layout (one writer per shard; written under ``<name>.tmp-<pid>`` and renamed when complete)::

    <store>/shard-<index:05d>/
        shard.json          schema_version, shard index, components, dims, model ids, sampler
                            settings, sha256 of every file below
        episodes.parquet    EPISODES_SCHEMA
        steps.parquet       STEPS_SCHEMA + one float32 column per raw reward component
                            (+ BLOCK_PROFILE_FIELDS when shard.json has block_profile)
        features.zarr/      Zarr v3 group: image_features (n_steps, D_img) float32,
                            text_features (n_episodes, D_txt) float32,
                            optional latents (n_steps, C, h, w) float16,
                            optional thumbnails (n_steps, H, W, 3) uint8
        episodes.tar        WebDataset: one sample per episode (thumbnails + JSON), keys w/o dots

Episodes are assigned to shards by a deterministic global order (prompt × seed), so the shard
index does not depend on the number of collector processes.

Steps are the visited points of the fine grid (``step`` = grid index ``i``), strictly increasing
within an episode but NOT contiguous: a root visits e.g. 0, 4, 8, 12, 15 under jumps. Each row's
``action`` is the id (in the dataset's action table, ``info["actions"]``, see
:mod:`addiffusion.diffusion.actions`) of the action taken there, and the next row of the episode
is at ``table.target(step, action)``; the last row of a complete episode has ``stop``. Roots start
at step 0. Branches are episodes of their own, stored generically as (parent, step, action):
``parent_episode_id`` names the episode they left, ``branch_step`` the parent's step where they
diverged and ``branch_action`` the (non-stop) action taken there instead of the parent's; the
branch's first row is the state that action led to (its step is
``table.target(branch_step, branch_action)``). Roots have ``parent_episode_id`` null and
``branch_step = branch_action = -1``; in the WebDataset JSON a root's ``parent_episode_id`` is
``JSON_ROOT_PARENT`` (``""``) instead, because JSON readers infer each field's type from the first
samples (``datasets``' webdataset builder reads five) and those are often all roots. A built
dataset's episodes table adds ``shard`` (int64, source shard index) and ``rl_split`` (string:
``train`` / ``val`` / ``heldout``; validation chosen by prompt).
"""

from __future__ import annotations

import pyarrow as pa


def normalize_prompt(text: str) -> str:
    """The identity of a prompt for splitting: stripped, inner whitespace collapsed, casefolded
    (``"A  red circle "`` and ``"a red circle"`` are one prompt)."""
    return " ".join(text.split()).casefold()


SCHEMA_VERSION = 1

EPISODES_SCHEMA = pa.schema(
    [
        (
            "episode_id",
            pa.string(),
        ),  # "<prompt_id:06d>-<seed>" for roots, "<root>-b<step>" for branches
        ("prompt_id", pa.int64()),
        ("prompt", pa.string()),
        ("category", pa.string()),  # complexity tier / prompt-set category
        ("split", pa.string()),  # "train" or "heldout"
        ("seed", pa.int64()),
        ("parent_episode_id", pa.string()),  # null for roots ("" in the WebDataset JSON)
        ("branch_step", pa.int32()),  # step of the parent where the branch diverged, -1 for roots
        ("branch_action", pa.int32()),  # action id taken at branch_step (jump/refine), -1 for roots
        ("num_steps", pa.int32()),
        ("text_row", pa.int64()),  # row of text_features in the shard's features.zarr
    ]
)

JSON_ROOT_PARENT = ""
"""``parent_episode_id`` of a root in the WebDataset JSON (Parquet has null). The JSON has no
nulls: a field that is null in the first samples would be typed null and fail on the first string."""

STEPS_SCHEMA = pa.schema(
    [
        ("episode_id", pa.string()),
        ("step", pa.int32()),  # grid index i, 0-based (strictly increasing, not contiguous)
        ("timestep", pa.float32()),  # the scheduler's t_i
        ("t_frac", pa.float32()),  # t_i / num_train_timesteps
        ("sigma", pa.float32()),  # noise level sqrt((1 - ᾱ) / ᾱ) at t_i
        ("action", pa.int8()),  # id of the action taken here (info['actions'] table)
        ("behavior_prob", pa.float32()),  # behaviour policy's probability of that action
        ("nfe", pa.int32()),  # cumulative denoiser evaluations when x̂0 of this step exists
        ("refines_used", pa.int32()),
        ("feature_row", pa.int64()),  # row of image_features in the shard's features.zarr
        ("wall_time_s", pa.float32()),  # wall time of producing this step
        ("peak_mem_bytes", pa.int64()),  # peak memory while producing it (CUDA, else RSS)
    ]
)
"""Plus one float32 column per raw reward component (``clip_score``, ``stability``,
``verifier``, ...), listed in ``shard.json["components"]``. Rewards are never stored here."""

BLOCK_PROFILE_FIELDS = [
    ("block_time_s", pa.list_(pa.float32())),  # per part, aligned with block_profile["parts"]
    ("block_peak_mem_bytes", pa.list_(pa.int64())),  # per block, block_profile["blocks"]
]
"""Optional steps columns, present exactly when ``shard.json`` has ``block_profile`` (collected
with ``collect.profile_blocks``; see :mod:`addiffusion.diffusion.profile`): the latency of each
part of the denoiser calls that produced the step (a partition: they sum to the denoiser's time;
like ``wall_time_s``, a batched step's cost shared evenly by its episodes) and each block's peak
memory above what was allocated when it started (CUDA, else sampled RSS). Stores without them
read as before: the columns are an addition, not a change of meaning, so the version stays."""
