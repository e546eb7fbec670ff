"""The dataset card (``README.md``) of a built dataset: Hub YAML ``configs`` + a short description.

The ``configs`` block is what ``datasets.load_dataset(<path or repo>, "<config>")`` and the Hub
viewer read: ``episodes`` and ``steps`` (Parquet, one split per data split). The WebDataset tars
(one sample per episode) load with ``load_dataset("webdataset", data_files=".../webdataset/*.tar")``
(``datasets`` picks one builder per repository, so they cannot be a config beside Parquet).
"""

from __future__ import annotations

import json
from typing import Any

import yaml


def _action_names(info: dict[str, Any]) -> dict[str, int]:
    """Action name -> id from the recorded action table (``info["actions"]``)."""
    return {str(a["name"]): int(a["id"]) for a in (info.get("actions") or {}).get("actions", [])}


def hub_configs(splits: list[str], webdataset: bool) -> list[dict[str, Any]]:
    configs: list[dict[str, Any]] = []
    for name in ("episodes", "steps"):
        configs.append(
            {
                "config_name": name,
                "data_files": [{"split": s, "path": f"data/{name}/{s}-*.parquet"} for s in splits],
                **({"default": True} if name == "episodes" else {}),
            }
        )
    # No "webdataset" config: `datasets` infers one builder per repository (Parquet here), so a
    # tar config would be read as Parquet. The tars load with the webdataset builder directly.
    del webdataset
    return configs


def dataset_card(info: dict[str, Any], splits: list[str], webdataset: bool) -> str:
    """Markdown with YAML front matter for the Hub."""
    front = {
        "configs": hub_configs(splits, webdataset),
        "tags": [
            "diffusion",
            "text-to-image",
            "offline-reinforcement-learning",
            "trajectories",
            "addiffusion",
        ],
        "license": "other",
    }
    counts = info["counts"]
    sampler = json.dumps(info.get("sampler", {}))
    return f"""---
{yaml.safe_dump(front, sort_keys=False).strip()}
---

# addiffusion denoising trajectories

Whole denoising runs of `{info.get("backbone")}` ({info.get("scheduler")} scheduler) recorded by
`addiffusion collect`: at every visited point of the fine grid (a path of jumps, plus branches
taking another jump or refine) the CLIP features of the one-step clean prediction x̂0 and the raw
reward components ({", ".join(info["components"])}, scored by `{info.get("scorer")}`).
Stopping at point *i* means decoding x̂0 at point *i*, so each trajectory holds the outcome of
every stop decision on its path. Rewards are not stored: `addiffusion datasets relabel` derives them from the raw
components for any weights / NFE penalty.

- {counts["episodes"]} episodes ({counts["root_episodes"]} roots), {counts["steps"]} steps,
  from {counts["shards"]} collector shards
- sampler: `{sampler}`
- actions: {json.dumps(_action_names(info))}; NFE: {info.get("nfe_convention", "")}
- schema version {info["schema_version"]}, layout version {info["layout_version"]}

## Layout

| path | content |
|---|---|
| `meta/info.json` | observation layout, model ids, sampler, components + normalisation stats, sha256 of every file |
| `data/episodes/<split>-NNNNN.parquet` | one row per episode (prompt, category, seed, split, `rl_split`, branch parent) |
| `data/steps/<split>-NNNNN.parquet` | one row per step (t, action, NFE, raw components, `feature_row`) |
| `features.zarr/` | Zarr v3 (sharding codec): `image_features[feature_row]`, `text_features[text_row]`, optional thumbnails / latents |
| `webdataset/*.tar` | one sample per episode: `<episode_id>.json` (+ `.png` x̂0 filmstrip) |

## Use

```python
from datasets import load_dataset
steps = load_dataset("<this repo or folder>", "steps")
episodes = load_dataset("<this repo or folder>", "episodes")
# one sample per episode (json + x̂0 filmstrip png), streamable:
tars = load_dataset("webdataset", data_files="<folder or hf://datasets/<repo>>/webdataset/*.tar",
                    split="train", streaming=True)
```

```bash
addiffusion datasets validate <folder>
addiffusion datasets relabel --dataset <folder> --out rewards.parquet
```
"""
