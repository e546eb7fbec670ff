"""Errors in what the user gives (params, prompt files, datasets, policies, scorers) end the real
CLI with exit status 2 and one line that names the file, row or key, with no traceback and
nothing on disk changed (issue 16: "bad values accepted", "errors that don't say what is wrong").
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path

import polars as pl
import pytest
import torch
import yaml

from addiffusion.cli import main
from addiffusion.config import SECTIONS, ConfigError, StageConfig
from addiffusion.datasets.build import build_dataset
from addiffusion.datasets.config import DatasetsConfig
from addiffusion.datasets.synthetic import write_synthetic_store

REPO = Path(__file__).resolve().parents[2]
REWARDS = {"weights": {"clip_score": 1.0, "stability": 0.1}, "c_nfe": 0.02}
"""Rewards of the synthetic dataset's components (params.yaml's weight the shapes verifier)."""


@pytest.fixture(scope="session")
def store_master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    torch.set_num_threads(1)
    root = tmp_path_factory.mktemp("store")
    write_synthetic_store(root, branch_step=2, n_max=5)
    return root


@pytest.fixture(scope="session")
def dataset_master(store_master: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    out = tmp_path_factory.mktemp("built") / "dataset"
    return build_dataset(store_master, out, DatasetsConfig(chunk_rows=20, val_fraction=0.25))


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    """(pipeline folder, open_clip folder) of the built-in random tiny models."""
    from addiffusion.diffusion.backbone import save_tiny_pipeline
    from addiffusion.rewards.clip import save_tiny_clip

    root = tmp_path_factory.mktemp("models")
    return save_tiny_pipeline(root / "tiny", 0), save_tiny_clip(root / "tiny-clip", 0)


def _merge(base: dict, values: dict) -> dict:
    """``base`` with ``values`` merged in key by key, nested mappings too."""
    out = dict(base)
    for key, value in values.items():
        old = out.get(key)
        out[key] = (
            _merge(old, value) if isinstance(old, dict) and isinstance(value, dict) else value
        )
    return out


def _nested(key: str, value: object) -> dict:
    """``a.b.c``, v -> ``{"a": {"b": {"c": v}}}``."""
    head, _, rest = key.partition(".")
    return {head: _nested(rest, value) if rest else value}


def _params(tmp_path: Path, **sections: dict) -> Path:
    """The repo's params.yaml with ``sections`` merged in (key by key, nested mappings too), the
    synthetic rewards."""
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["rewards"] = dict(REWARDS)
    for name, values in sections.items():
        params[name] = _merge(params.get(name) or {}, values)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


def _tree(root: Path, ignore: tuple[str, ...] = ()) -> dict[str, str]:
    """Every path under ``root`` but ``ignore`` with the sha256 of its bytes ("" for a folder)."""
    return {
        str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""
        for p in sorted(root.rglob("*"))
        if str(p.relative_to(root)) not in ignore
    }


STORE_RECORD = ("store", "store/.locks", "store/collect.json")
"""What ``collect`` writes before it loads any model: the store's settings record and rank
locks. (A failed start leaves them; see the scorer tests.)"""


def _fails(
    argv: list[str],
    capsys: pytest.CaptureFixture[str],
    root: Path,
    ignore: tuple[str, ...] = (),
) -> str:
    """Run ``addiffusion argv``: exit 2, one error line and no traceback, ``root`` unchanged
    (but ``ignore``); returns the error line."""
    before = _tree(root)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.startswith("addiffusion: error: ")]
    assert len(lines) == 1 and err.rstrip().endswith(lines[0]), err
    assert _tree(root, ignore) == before
    return lines[0]


def test_sections_are_the_stage_configs() -> None:
    # Every config module of the package, so the check does not depend on what other tests
    # imported before it.
    package = Path(importlib.import_module("addiffusion").__file__).parent
    for path in sorted(package.rglob("config.py")):
        rel = path.relative_to(package.parent).with_suffix("")
        importlib.import_module(".".join(rel.parts))
    ours = [c for c in StageConfig.__subclasses__() if c.__module__.startswith("addiffusion.")]
    assert sorted(c.section for c in ours) == sorted(SECTIONS)


@pytest.mark.parametrize(
    ("section", "key", "value"),
    [
        ("rewards", "weights", {"clip_score": float("nan"), "stability": 0.1}),
        ("rewards", "weights", {"clip_score": 1.0, "stability": float("inf")}),
        ("rewards", "terminal_bonus", float("nan")),
        ("rewards", "terminal_bonus", float("inf")),
        ("rewards", "c_nfe", float("inf")),
    ],
)
def test_non_finite_reward_settings(
    section: str,
    key: str,
    value: object,
    dataset_master: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    params = _params(tmp_path, **{section: {key: value}})
    out = tmp_path / "rewards.parquet"
    line = _fails(
        ["datasets", "relabel", "--dataset", str(dataset_master), "--out", str(out)]
        + ["--params", str(params)],
        capsys,
        tmp_path,
    )
    assert f"{section}.{key}" in line and "must be a finite number" in line


OFFLINE_TRAIN = [
    *["offline-rl", "train", "--dataset", "{tmp}/ds", "--rewards", "{tmp}/r.parquet"],
    *["--out", "{tmp}/out"],
]
ONLINE_FINETUNE = [
    *["online-finetune", "--dataset", "{tmp}/ds", "--offline", "{tmp}/o", "--out", "{tmp}/out"],
]


@pytest.mark.parametrize(
    ("command", "section", "key"),
    [
        (["collect", "--store", "{tmp}/store"], "collect", "guidance_scale"),
        (["collect", "--store", "{tmp}/store"], "collect", "mask_blur_sigma"),
        (OFFLINE_TRAIN, "offline_rl", "iql.actor_learning_rate"),
        (OFFLINE_TRAIN, "offline_rl", "cql.alpha"),
        (OFFLINE_TRAIN, "offline_rl", "bcq.action_flexibility"),
        (OFFLINE_TRAIN, "offline_rl", "fqe.learning_rate"),
        (ONLINE_FINETUNE, "online_finetune", "learning_rate"),
    ],
)
def test_non_finite_floats_name_the_key(
    command: list[str],
    section: str,
    key: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    params = _params(tmp_path, **_nested(f"{section}.{key}", float("nan")))
    argv = [a.format(tmp=tmp_path) for a in command] + ["--params", str(params)]
    line = _fails(argv, capsys, tmp_path)
    assert f"{section}.{key} must be a finite number, got nan" in line


def test_unknown_section_names_key_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = _params(tmp_path)
    text = params.read_text().replace("rewards:", "reward:")
    params.write_text(text)
    line_no = text.splitlines().index("reward:") + 1
    line = _fails(
        ["collect", "--store", str(tmp_path / "store"), "--params", str(params), "--quiet"],
        capsys,
        tmp_path,
    )
    assert f"{params}:{line_no}: unknown section 'reward'" in line and "rewards" in line


def test_duplicate_key_names_key_and_line(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    params = tmp_path / "params.yaml"
    params.write_text("collect:\n  n_max: 4\n  seed: 1\n  n_max: 16\n")
    line = _fails(
        ["collect", "--store", str(tmp_path / "store"), "--params", str(params), "--quiet"],
        capsys,
        tmp_path,
    )
    assert f"{params}:4: key 'n_max' is given twice (first on line 2)" in line
    params.write_text("collect:\n  seed: 1\ncollect:\n  seed: 2\n")
    line = _fails(
        ["collect", "--store", str(tmp_path / "s"), "--params", str(params)], capsys, tmp_path
    )
    assert f"{params}:3: key 'collect' is given twice" in line


@pytest.mark.parametrize(
    ("command", "key", "value", "named"),
    [
        (["collect", "--store", "{tmp}/store"], "collect.seed", -1, "collect.seed"),
        (
            ["datasets", "build", "--store", "{tmp}/store", "--out", "{tmp}/ds"],
            "datasets.split_seed",
            -1,
            "datasets.split_seed",
        ),
        (OFFLINE_TRAIN, "offline_rl.seeds", [0, -1], "offline_rl.seeds[1]"),
        (ONLINE_FINETUNE, "online_finetune.seeds", [-1], "online_finetune.seeds[0]"),
        (["eval", "--dataset", "{tmp}/ds", "--out", "{tmp}/out"], "eval.seed", -1, "eval.seed"),
    ],
)
def test_negative_seed_names_the_key(
    command: list[str],
    key: str,
    value: object,
    named: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    params = _params(tmp_path, **_nested(key, value))
    argv = [a.format(tmp=tmp_path) for a in command] + ["--params", str(params)]
    assert f"{named} must be >= 0" in _fails(argv, capsys, tmp_path)


@pytest.mark.parametrize(
    ("command", "section", "values", "message"),
    [
        # Renamed: the message says to what.
        (
            ONLINE_FINETUNE,
            "online_finetune",
            {"seed": 3},
            "unknown key online_finetune.seed: it became online_finetune.seeds",
        ),
        # The old flat offline_rl keys: each algorithm's d3rlpy settings are its own section now.
        (OFFLINE_TRAIN, "offline_rl", {"seed": 3}, "unknown key offline_rl.seed (known keys"),
        (OFFLINE_TRAIN, "offline_rl", {"beta": 3.0}, "unknown key offline_rl.beta (known keys"),
        (
            OFFLINE_TRAIN,
            "offline_rl",
            {"iql": {"cql_alpha": 1.0}},
            "unknown key offline_rl.iql.cql_alpha: DiscreteIQLConfig has no scalar field",
        ),
        (
            OFFLINE_TRAIN,
            "offline_rl",
            {"iql": {"actor_encoder_factory": "vector"}},
            "offline_rl.iql.actor_encoder_factory is set by the pipeline",
        ),
        (OFFLINE_TRAIN, "offline_rl", {"iql": {"n_critics": 0}}, "offline_rl.iql.n_critics must"),
        (OFFLINE_TRAIN, "offline_rl", {"seeds": []}, "offline_rl.seeds must be a non-empty list"),
        (
            OFFLINE_TRAIN,
            "offline_rl",
            {"baselines": ["bcq", "bcq"]},
            "offline_rl.baselines must be a list without repeats",
        ),
        (
            ONLINE_FINETUNE,
            "online_finetune",
            {"seeds": [2, 2]},
            "online_finetune.seeds must be a list without repeats",
        ),
        (
            ONLINE_FINETUNE,
            "online_finetune",
            {"from_scratch": "yes"},
            "online_finetune.from_scratch must be true or false",
        ),
    ],
)
def test_bad_keys_of_the_training_sections(
    command: list[str],
    section: str,
    values: dict,
    message: str,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    params = _params(tmp_path, **{section: values})
    argv = [a.format(tmp=tmp_path) for a in command] + ["--params", str(params)]
    assert message in _fails(argv, capsys, tmp_path)


def test_negative_shapes_seed() -> None:
    from addiffusion.worlds.shapes.config import ShapesConfig

    with pytest.raises(ConfigError, match=r"^shapes\.seed must be >= 0, got -1$"):
        ShapesConfig.from_dict({"seed": -1})


def test_prompt_file_not_utf8(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_bytes(b"a red circle\n" + "un caf\u00e9 bleu\n".encode("latin-1"))
    params = _params(tmp_path, collect={"prompts": str(prompts), "scorers": []})
    line = _fails(
        ["collect", "--store", str(tmp_path / "store"), "--params", str(params), "--quiet"],
        capsys,
        tmp_path,
    )
    assert f"prompt file {prompts}:2: not UTF-8" in line


def _relabel_line(
    dataset_master: Path,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    corrupt: Callable[[Path], None],
) -> tuple[Path, str]:
    """Copy the dataset, ``corrupt`` its second steps Parquet file, run relabel on it: (that file,
    the one error line)."""
    dataset = Path(shutil.copytree(dataset_master, tmp_path / "dataset"))
    bad = sorted((dataset / "data" / "steps").glob("*.parquet"))[1]
    corrupt(bad)
    out = tmp_path / "rewards.parquet"
    line = _fails(
        ["datasets", "relabel", "--dataset", str(dataset), "--out", str(out)]
        + ["--params", str(_params(tmp_path))],
        capsys,
        tmp_path,
    )
    return bad, line


def test_corrupt_parquet_at_relabel(
    dataset_master: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    bad, line = _relabel_line(
        dataset_master, tmp_path, capsys, lambda f: f.write_bytes(f.read_bytes()[:-40])
    )
    assert f"{bad}: cannot read Parquet" in line


def test_nan_component_refused_at_relabel(
    dataset_master: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    def nan_at_row_3(f: Path) -> None:
        steps = pl.read_parquet(f)
        scores = steps["clip_score"].to_list()
        scores[3] = float("nan")
        steps.with_columns(
            pl.Series("clip_score", scores, dtype=steps["clip_score"].dtype)
        ).write_parquet(f)

    bad, line = _relabel_line(dataset_master, tmp_path, capsys, nan_at_row_3)
    episode = pl.read_parquet(bad)["episode_id"][3]
    assert f"{bad}: row 3 (episode_id {episode}, step" in line
    assert "clip_score is nan" in line and "rewards.weights" in line


def test_garbage_manifest(
    dataset_master: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    offline = tmp_path / "offline"
    offline.mkdir()
    (offline / "policy.d3").write_bytes(b"not a policy")
    (offline / "manifest.json").write_text('{"format": "addiffusion.offline_rl", "sha')
    line = _fails(
        ["eval", "--dataset", str(dataset_master), "--offline", str(offline)]
        + ["--out", str(tmp_path / "eval"), "--params", str(_params(tmp_path)), "--quiet"],
        capsys,
        tmp_path,
    )
    assert f"{offline / 'manifest.json'} is not valid JSON" in line


def test_shard_json_without_image_dim(
    store_master: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``validate`` reports it as a problem of that shard.json (exit 1: its report of problems),
    instead of a KeyError."""
    store = Path(shutil.copytree(store_master, tmp_path / "store"))
    info_path = store / "shard-00001" / "shard.json"
    info = json.loads(info_path.read_text())
    del info["image_dim"]
    info_path.write_text(json.dumps(info))
    before = _tree(tmp_path)
    assert main(["datasets", "validate", str(store)]) == 1
    out = capsys.readouterr()
    assert f"{info_path}: has no image_dim entry" in out.out and "Traceback" not in out.err
    assert _tree(tmp_path) == before


def test_scorer_folder_missing(
    tiny_models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "models" / "no_clip"
    params = _params(
        tmp_path,
        collect={"model": str(tiny_models[0]), "scorer": str(missing), "prompts": "builtin"}
        | {"n_prompts": 2, "n_max": 4, "scorers": [], "device": "cpu"},
    )
    line = _fails(
        ["collect", "--store", str(tmp_path / "store"), "--params", str(params), "--quiet"],
        capsys,
        tmp_path,
        ignore=STORE_RECORD,
    )
    assert f"scorer {str(missing)!r}: no such folder" in line and "collect.scorer" in line


def test_scorer_weights_truncated(
    tiny_models: tuple[Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    clip = Path(shutil.copytree(tiny_models[1], tmp_path / "clip"))
    weights = clip / "open_clip_model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    params = _params(
        tmp_path,
        collect={"model": str(tiny_models[0]), "scorer": str(clip), "prompts": "builtin"}
        | {"n_prompts": 2, "n_max": 4, "scorers": [], "device": "cpu"},
    )
    line = _fails(
        ["collect", "--store", str(tmp_path / "store"), "--params", str(params), "--quiet"],
        capsys,
        tmp_path,
        ignore=STORE_RECORD,
    )
    assert f"cannot load the scorer's weights {weights} (" in line


def test_missing_input_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    params = _params(tmp_path)
    missing = tmp_path / "nothing"
    argv = ["datasets", "relabel", "--dataset", str(missing), "--out", str(tmp_path / "r.parquet")]
    line = _fails([*argv, "--params", str(params)], capsys, tmp_path)
    assert f"{missing / 'meta' / 'info.json'} not found" in line
    line = _fails([*argv, "--params", str(tmp_path / "p.yaml")], capsys, tmp_path)
    assert f"params file {tmp_path / 'p.yaml'} not found" in line


def test_debug_shows_the_traceback(tmp_path: Path) -> None:
    params = _params(tmp_path, collect={"seed": -1})
    with pytest.raises(ConfigError, match="collect.seed"):
        main(["--debug", "collect", "--store", str(tmp_path / "s"), "--params", str(params)])


def test_console_script_exits_2_without_traceback(tmp_path: Path) -> None:
    """The real process: ``python -m addiffusion`` (what the console script runs)."""
    params = _params(tmp_path)
    params.write_text(params.read_text().replace("rewards:", "reward:"))
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    run = subprocess.run(
        [sys.executable, "-m", "addiffusion", "collect", "--store", str(tmp_path / "s")]
        + ["--params", str(params)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert run.returncode == 2, run.stderr
    assert "Traceback" not in run.stderr
    assert run.stderr.strip().splitlines()[-1].startswith(f"addiffusion: error: {params}:")
    assert not (tmp_path / "s").exists()
