"""``addiffusion bench <name>``: benchmarks that print ratios measured side by side in one run.

Each benchmark lives beside the code it measures and exposes ``register_bench(subparsers)``.
"""

from __future__ import annotations

import argparse
import importlib

BENCHMARKS = {
    "shapes": "addiffusion.worlds.shapes.bench",
    "collect": "addiffusion.collect.bench",
    "preview": "addiffusion.collect.preview_bench",
    "relabel": "addiffusion.datasets.bench",
    "policy": "addiffusion.policy.bench",
    "cost": "addiffusion.bench.cost",
}


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "bench",
        help="benchmarks (ratios measured side by side in one run)",
        description="Benchmarks that time two ways of doing the same work side by side in one "
        "run, so machine speed cancels out of the ratio they print. `shapes` and `policy` are "
        "dvc.yaml stages; `collect`, `preview`, `relabel` and `cost` (observation vs denoiser "
        "step at SD 1.5 / SDXL / SD3 size, from public configs) are helpers.",
    )
    bench_sub = parser.add_subparsers(dest="bench", required=True, metavar="<benchmark>")
    for module_name in BENCHMARKS.values():
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name is None or not module_name.startswith(e.name):
                raise
            continue
        module.register_bench(bench_sub)
