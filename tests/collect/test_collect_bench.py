from __future__ import annotations

from pathlib import Path

from addiffusion.collect.bench import run_bench
from addiffusion.collect.config import CollectConfig


def test_bench_reports_ratio_and_phases(tiny_models: tuple[Path, Path]) -> None:
    cfg = CollectConfig.from_dict(
        {"model": str(tiny_models[0]), "scorer": str(tiny_models[1]), "n_max": 2, "device": "cpu"}
    )
    res = run_bench(cfg, batch=1, repeats=1)
    assert res["plain_s"] > 0 and res["collect_s"] > 0
    assert res["collect_overhead_ratio"] == res["collect_s"] / res["plain_s"]
    assert all(res[f"collect_{k}_s"] > 0 for k in ("denoiser", "decode", "clip", "writing"))
