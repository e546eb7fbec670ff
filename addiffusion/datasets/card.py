"""The dataset card (``README.md``) of a built dataset: Hub YAML ``configs`` + a short description.

The ``configs`` block is what ``datasets.load_dataset(<path or repo>, "<config>")`` and the Hub
viewer read: ``episodes`` and ``steps`` (Parquet, one split per data split). The WebDataset tars
(one sample per episode) load with ``load_dataset("webdataset", data_files=".../webdataset/*.tar")``
(``datasets`` picks one builder per repository, so they cannot be a config beside Parquet).
The license metadata comes from ``datasets.license`` (:class:`DatasetsConfig`).
"""

from __future__ import annotations

import json
from typing import Any

from huggingface_hub import DatasetCardData

from addiffusion.datasets.config import DatasetsConfig


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


def card_data(splits: list[str], cfg: DatasetsConfig) -> DatasetCardData:
    """The card's metadata: Hub ``configs``, tags and the license (``datasets.license``; with
    ``other``, ``license_name`` and ``license_link`` as the Hub requires)."""
    return DatasetCardData(
        license=cfg.license,
        license_name=cfg.license_name or None,  # set only with "other" (DatasetsConfig checks)
        license_link=cfg.license_link or None,
        tags=[
            "diffusion",
            "text-to-image",
            "offline-reinforcement-learning",
            "trajectories",
            "addiffusion",
        ],
        configs=hub_configs(splits, cfg.write_webdataset),
    )


def _license_line(cfg: DatasetsConfig) -> str:
    if cfg.license == "unknown":
        return "not declared (`unknown`): set `datasets.license` and rebuild before sharing"
    if cfg.license == "other":
        return f"[{cfg.license_name}]({cfg.license_link})"
    return f"`{cfg.license}`"


def dataset_card(info: dict[str, Any], splits: list[str], cfg: DatasetsConfig) -> str:
    """Markdown with YAML front matter for the Hub."""
    counts = info["counts"]
    sampler = json.dumps(info.get("sampler", {}))
    return f"""---
{card_data(splits, cfg).to_yaml()}
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
- license: {_license_line(cfg)}; the records derive from outputs of
  `{info.get("backbone")}` on the collected prompts, whose terms also apply

## Layout

| path | content |
|---|---|
| `meta/info.json` | observation layout, model ids, sampler, components + normalisation stats, sha256 of every file |
| `data/episodes/<split>-NNNNN.parquet` | one row per episode (prompt, category, seed, split, `rl_split`, branch parent) |
| `data/steps/<split>-NNNNN.parquet` | one row per step (t, action, NFE, raw components, `feature_row`) |
| `features.zarr/` | Zarr v3 (sharding codec): `image_features[feature_row]`, `text_features[text_row]`, optional thumbnails / latents |
| `webdataset/*.tar` | one sample per episode: `<episode_id>.json` (the episode row + its `steps`; a root's `parent_episode_id` is `""` there, null in Parquet) (+ `.png` x̂0 filmstrip) |

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
