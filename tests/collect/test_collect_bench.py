from __future__ import annotations

from pathlib import Path

from addiffusion.collect.bench import run_bench
from addiffusion.collect.config import CollectConfig
from addiffusion.worlds.shapes.preview import build_preview


def test_bench_reports_ratio_and_phases_per_decoder(
    tiny_models: tuple[Path, Path], tmp_path: Path
) -> None:
    build_preview(0).save_pretrained(tmp_path / "taesd")
    cfg = CollectConfig.from_dict(
        {
            "model": str(tiny_models[0]),
            "scorer": str(tiny_models[1]),
            "n_max": 2,
            "device": "cpu",
            "preview": str(tmp_path / "taesd"),
        }
    )
    res = run_bench(cfg, batch=1, repeats=1)
    assert res["plain_s"] > 0 and list(res["observers"]) == ["preview", "vae"]
    for r in res["observers"].values():
        assert r["collect_s"] > 0
        assert r["collect_overhead_ratio"] == r["collect_s"] / res["plain_s"]
        assert all(r[f"collect_{k}_s"] > 0 for k in ("denoiser", "decode", "clip", "writing"))
    only = run_bench(cfg, batch=1, repeats=1, observers=("vae",))
    assert list(only["observers"]) == ["vae"]
