"""Collecting with the preview decoder: the store and the built dataset record which decoder
produced the observations, the task reads it back, and a store is never resumed with another."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest

from addiffusion.collect.collector import collect
from addiffusion.collect.config import CollectConfig
from addiffusion.collect.resume import StoreConflict
from addiffusion.config import ConfigError
from addiffusion.datasets.build import build_dataset
from addiffusion.datasets.config import DatasetsConfig
from addiffusion.datasets.store import read_store
from addiffusion.task import read_task, task_sampler
from addiffusion.worlds.shapes.preview import build_preview


@pytest.fixture(scope="module")
def preview_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("preview") / "taesd"
    build_preview(0).save_pretrained(out)
    return out


def _cfg(make: Callable[..., CollectConfig], **kw: object) -> CollectConfig:
    base = dict(
        warmup=1,
        refine_budget=0,
        branch_prob=0.0,
        n_prompts=4,
        heldout_fraction=0.5,
        shard_size=4,
        batch_size=4,
    )
    return make(**{**base, **kw})


def test_store_and_dataset_record_the_observations_decoder(
    tmp_path: Path, small_collect: Callable[..., CollectConfig], preview_dir: Path
) -> None:
    cfg = _cfg(small_collect, observe_with="preview", preview=str(preview_dir))
    collect(cfg, tmp_path / "store", progress=False)
    (shard,) = read_store(tmp_path / "store")
    assert shard.info["sampler"]["observe_with"] == "preview"
    assert shard.info["preview"] == str(preview_dir)
    build_dataset(tmp_path / "store", tmp_path / "ds", DatasetsConfig())
    task = read_task(tmp_path / "ds")
    assert task.observer == {"observe_with": "preview", "preview": str(preview_dir)}
    # Every consumer's sampler observes with the same decoder.
    sampler = task_sampler(task, "cpu")
    assert sampler.preview is not None and sampler.settings.observe_with == "preview"
    assert task_sampler(task, "cpu", share=sampler, scheduler="euler").preview is sampler.preview

    # The same episodes observed by the VAE: the same denoising, other recorded observations.
    vae = dataclasses.replace(cfg, observe_with="vae")
    collect(vae, tmp_path / "vae", progress=False)
    (ref,) = read_store(tmp_path / "vae")
    assert ref.info["preview"] == "" and ref.info["sampler"]["observe_with"] == "vae"
    cols = ["episode_id", "step", "nfe", "timestep"]
    assert shard.steps.select(cols).equals(ref.steps.select(cols))
    assert not np.allclose(shard.steps["clip_score"], ref.steps["clip_score"])


def test_resuming_with_another_decoder_is_refused(
    tmp_path: Path, small_collect: Callable[..., CollectConfig], preview_dir: Path
) -> None:
    cfg = _cfg(small_collect)
    collect(cfg, tmp_path / "store", progress=False)
    other = dataclasses.replace(cfg, observe_with="preview", preview=str(preview_dir))
    with pytest.raises(
        StoreConflict, match="collect.observe_with is 'preview' in params but 'vae'"
    ):
        collect(other, tmp_path / "store", progress=False)


def test_preview_needs_a_decoder_name(small_collect: Callable[..., CollectConfig]) -> None:
    with pytest.raises(ConfigError, match="collect.preview must be an AutoencoderTiny folder"):
        _cfg(small_collect, observe_with="preview", preview="")
    with pytest.raises(ConfigError, match="collect.observe_with must be vae or preview"):
        _cfg(small_collect, observe_with="taesd")


def test_preview_bench_compares_the_two_decoders_at_every_point(
    small_collect: Callable[..., CollectConfig],
    preview_dir: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from addiffusion.collect.preview_bench import run_preview_bench

    cfg = _cfg(small_collect, preview=str(preview_dir), n_prompts=8)
    res = run_preview_bench(cfg, n_prompts=3, batch=2)
    assert res["episodes"] == 3 and res["points"] == 3 * cfg.n_max
    assert set(res["components"]) == {"clip_score"}
    for part in ("all", "early", "middle", "late"):
        assert -1.0 <= res["components"]["clip_score"][part]["pearson"] <= 1.0
    assert res["components"]["clip_score"]["all"]["mean_abs_diff"] > 0
    assert res["decode_ms"]["vae"] > 0 and res["decode_ms"]["preview"] > 0
