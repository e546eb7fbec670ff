from __future__ import annotations

import argparse
import json
from pathlib import Path

import pytest
import yaml

from addiffusion.cli import run
from addiffusion.config import ConfigError
from addiffusion.datasets import bench, cli
from addiffusion.datasets.config import DatasetsConfig
from addiffusion.datasets.relabel import scan_table


def main(argv: list[str]) -> int:
    """``addiffusion`` with only this stage's commands (the full CLI imports every stage)."""
    parser = argparse.ArgumentParser(prog="addiffusion")
    sub = parser.add_subparsers(dest="command", required=True)
    cli.register(sub)
    bench_sub = sub.add_parser("bench").add_subparsers(dest="bench", required=True)
    bench.register_bench(bench_sub)
    return run(parser.parse_args(argv))


def _params(tmp_path: Path, **datasets: object) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(
        yaml.safe_dump(
            {
                "datasets": {"chunk_rows": 50, **datasets},
                "rewards": {"weights": {"clip_score": 1.0, "stability": 0.1}, "c_nfe": 0.02},
            }
        )
    )
    return p


def test_cli_build_validate_relabel_stats(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = _params(tmp_path)
    out = tmp_path / "ds"
    assert (
        main(
            ["datasets", "build", "--store", str(store), "--out", str(out), "--params", str(params)]
        )
        == 0
    )
    n_eps = scan_table(out, "episodes").collect().height
    n_steps = scan_table(out, "steps").collect().height
    assert n_eps == 20  # 12 roots; the 8 visiting step 2 branch there (conftest)
    assert f"{n_eps} episodes, {n_steps} steps from 3 shards" in capsys.readouterr().out
    assert main(["datasets", "validate", str(out)]) == 0
    assert main(["datasets", "validate", str(store / "shard-00000")]) == 0
    assert (
        main(
            [
                "datasets",
                "relabel",
                "--dataset",
                str(out),
                "--out",
                str(tmp_path / "r" / "rewards.parquet"),
                "--params",
                str(params),
            ]
        )
        == 0
    )
    summary = json.loads((tmp_path / "r" / "rewards.json").read_text())
    assert summary["rows"] == n_steps and summary["rewards"]["c_nfe"] == 0.02
    assert (
        main(
            ["datasets", "stats", str(out), "--out", str(tmp_path / "st"), "--params", str(params)]
        )
        == 0
    )
    stats = json.loads((tmp_path / "st" / "stats.json").read_text())
    assert stats["steps"] == n_steps and stats["branches"] == 8
    assert set(stats["categories"]) == {"simple", "hard"}
    # Every episode ends with one stop; the other rows are the jumps of the root patterns.
    actions = stats["behaviour_actions"]
    assert set(actions) == {"jump-1", "jump-2", "stop"} and actions["stop"] == n_eps
    assert sum(actions.values()) == n_steps
    assert (tmp_path / "st" / "stats.png").read_bytes()[:4] == b"\x89PNG"


def test_cli_validate_reports_and_exits_1(store: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = store / "shard-00002" / "episodes.parquet"
    p.write_bytes(p.read_bytes()[:-30])
    assert main(["datasets", "validate", str(store)]) == 1
    out = capsys.readouterr()
    assert f"{p}: cannot read Parquet" in out.out and "problem(s)" in out.err
    assert main(["datasets", "validate", str(store.parent / "nothing")]) == 1


def test_cli_build_refuses_corrupted_store(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (store / "shard-00000" / "shard.json").write_text(json.dumps({"schema_version": 99}))
    assert (
        main(
            [
                "datasets",
                "build",
                "--store",
                str(store),
                "--out",
                str(tmp_path / "ds"),
                "--params",
                str(_params(tmp_path)),
            ]
        )
        == 2
    )
    assert "schema_version 99" in capsys.readouterr().err and not (tmp_path / "ds").exists()


def test_config_errors_name_the_key(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ConfigError, match=r"datasets.val_fraction must be in \[0, 1\), got 1.5"):
        DatasetsConfig.from_dict({"val_fraction": 1.5})
    with pytest.raises(ConfigError, match="unknown key datasets.chunk_size"):
        DatasetsConfig.from_dict({"chunk_size": 3})
    argv = ["datasets", "build", "--store", "x", "--out", str(tmp_path / "o")]
    assert main([*argv, "--params", str(_params(tmp_path, chunk_rows=0))]) == 2
    assert "datasets.chunk_rows must be >= 1, got 0" in capsys.readouterr().err


def test_relabel_bench_prints_seconds(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "relabel", "--steps", "2000", "--n-max", "10"]) == 0
    out = capsys.readouterr().out.strip().splitlines()
    assert out[-1].startswith("relabel_seconds=") and float(out[-1].split("=")[1]) >= 0
    assert "branch edges" in out[0]
