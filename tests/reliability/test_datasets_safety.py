"""Datasets that cannot be lost or poisoned (issue 16, cases 2, 3, 4 and 6).

Each case runs the real command through ``addiffusion.cli.main`` where there is one, asserts its
exit status, that the message names the file, and that nothing on disk was lost or changed.
"""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import polars as pl
import pytest
import yaml

from addiffusion.cli import main
from addiffusion.datasets import hub
from addiffusion.datasets.build import build_dataset
from addiffusion.datasets.config import DatasetsConfig
from addiffusion.datasets.store import init_store, sha256_file
from addiffusion.datasets.synthetic import write_synthetic_store


def tree(root: Path) -> dict[str, str]:
    """Every file and link under ``root`` (and ``root`` itself if a file) with its sha256."""
    if root.is_file():
        return {".": sha256_file(root)}
    return {
        p.relative_to(root).as_posix(): (sha256_file(p) if p.is_file() else "dir")
        for p in sorted(root.rglob("*"))
    }


@pytest.fixture(scope="module")
def master(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("safety") / "store"
    write_synthetic_store(root, branch_step=2)
    return root


@pytest.fixture()
def store(master: Path, tmp_path: Path) -> Path:
    return Path(shutil.copytree(master, tmp_path / "work" / "store"))


@pytest.fixture()
def params(tmp_path: Path) -> Path:
    p = tmp_path / "params.yaml"
    p.write_text(yaml.safe_dump({"datasets": {"chunk_rows": 50, "val_fraction": 0.5}}))
    return p


def build(store: Path, out: Path, params: Path, *extra: str) -> int:
    argv = ["datasets", "build", "--store", str(store), "--out", str(out), "--params", str(params)]
    return main([*argv, *extra])


# --- 2. a strict Hub allow-list ------------------------------------------------------------


def test_built_dataset_is_all_allowed_and_strays_are_not(store: Path, tmp_path: Path) -> None:
    out = build_dataset(store, tmp_path / "ds", DatasetsConfig(chunk_rows=20))
    files = [p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file()]
    assert any(f.startswith("features.zarr/image_features/c/") for f in files)
    assert hub.split_files(files) == (sorted(files), [])
    for bad in (
        "features.zarr/evil.pkl",
        "features.zarr/image_features/c/0/0.pt",
        "features.zarr/image_features/payload",
        "features.zarr/other/zarr.json",
        "data/steps/train-00000.pkl",
        "meta/extra.json",
        "policy.d3",
        "webdataset/x.tar.gz",
    ):
        assert not hub.allowed_file(bad), bad


def test_push_refuses_a_pickle_under_features_zarr(
    store: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = build_dataset(store, tmp_path / "ds", DatasetsConfig(chunk_rows=20))
    evil = out / "features.zarr" / "evil.pkl"
    evil.write_bytes(b"\x80\x04K\x01.")
    # Listed in the manifest too: only the allow-list stands between it and the Hub.
    info = json.loads((out / "meta" / "info.json").read_text())
    info["files"]["features.zarr/evil.pkl"] = sha256_file(evil)
    (out / "meta" / "info.json").write_text(json.dumps(info))
    before = tree(out)
    assert main(["datasets", "push", "--dataset", str(out), "--repo-id", "u/r"]) == 2
    err = capsys.readouterr().err
    assert "features.zarr/evil.pkl" in err and "refusing to push" in err
    assert tree(out) == before


def test_load_skips_stray_files_with_a_warning(store: Path, tmp_path: Path) -> None:
    out = build_dataset(store, tmp_path / "ds", DatasetsConfig(chunk_rows=20))
    stray = out / "features.zarr" / "image_features" / "c" / "payload.pt"
    stray.write_bytes(b"not a chunk")
    before = tree(out)
    with pytest.warns(UserWarning, match="features.zarr/image_features/c/payload.pt"):
        assert hub.load(out) == out
    assert tree(out) == before


def test_hub_load_downloads_allowed_names_only(
    store: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import huggingface_hub

    out = build_dataset(store, tmp_path / "ds", DatasetsConfig(chunk_rows=20))
    files = sorted(p.relative_to(out).as_posix() for p in out.rglob("*") if p.is_file())
    asked: dict[str, object] = {}

    class Api:
        def list_repo_files(self, repo_id: str, **kw: object) -> list[str]:
            return [*files, ".gitattributes", "features.zarr/evil.pkl"]

    def snapshot_download(repo_id: str, allow_patterns: list[str], **kw: object) -> str:
        asked["patterns"] = allow_patterns
        return str(out)

    monkeypatch.setattr(huggingface_hub, "HfApi", Api)
    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    with pytest.warns(UserWarning, match="u/r: skipping features.zarr/evil.pkl"):
        assert hub.load("u/r") == out
    assert asked["patterns"] == files


# --- 3. build --out that cannot destroy ----------------------------------------------------


@pytest.mark.parametrize("where", ["store", "parent", "inside"])
def test_build_out_never_the_store_or_around_it(
    where: str, store: Path, params: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    parent = store.parent
    (parent / "notes.txt").write_text("mine")
    out = {"store": store, "parent": parent, "inside": store / "dataset"}[where]
    before = tree(parent)
    assert build(store, out, params) == 2
    err = capsys.readouterr().err
    assert str(out) in err and "--out" in err
    assert tree(parent) == before


def test_build_out_over_a_file_keeps_it_and_leaves_nothing(
    store: Path, tmp_path: Path, params: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "results.csv"
    out.write_text("a,b\n1,2\n")
    listing = sorted(p.name for p in tmp_path.iterdir())
    assert build(store, out, params) == 2
    assert str(out) in capsys.readouterr().err
    assert out.read_text() == "a,b\n1,2\n"
    assert sorted(p.name for p in tmp_path.iterdir()) == listing  # no .results.csv.old-PID


def test_build_out_over_a_folder_of_other_files(
    store: Path, tmp_path: Path, params: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    before = tree(out)
    assert build(store, out, params) == 2
    assert str(out) in capsys.readouterr().err
    assert tree(out) == before


def test_build_out_over_own_dataset_with_a_user_file_inside(
    store: Path, tmp_path: Path, params: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "ds"
    assert build(store, out, params) == 0
    (out / "my_analysis.ipynb").write_text("{}")
    before = tree(out)
    assert build(store, out, params) == 2
    assert "my_analysis.ipynb" in capsys.readouterr().err
    assert tree(out) == before


def test_build_replaces_its_own_dataset_and_fills_an_empty_folder(
    store: Path, tmp_path: Path, params: Path
) -> None:
    out = tmp_path / "ds"
    out.mkdir()
    assert build(store, out, params) == 0
    first = tree(out)
    info = json.loads((out / "meta" / "info.json").read_text())
    assert info["built_by"] == "addiffusion datasets build"
    assert build(store, out, params) == 0
    assert tree(out) == first  # deterministic, swapped in whole
    assert sorted(p.name for p in tmp_path.iterdir()) == ["ds", "params.yaml", "work"]


# --- 4. store-level completeness -----------------------------------------------------------


def _validate(path: Path, capsys: pytest.CaptureFixture[str]) -> tuple[int, str]:
    code = main(["datasets", "validate", str(path)])
    c = capsys.readouterr()
    return code, c.out + c.err


def _refused(
    store: Path, tmp_path: Path, params: Path, capsys: pytest.CaptureFixture[str], *extra: str
) -> str:
    before = tree(store)
    assert build(store, tmp_path / "ds", params, *extra) == 2
    assert not (tmp_path / "ds").exists()
    assert tree(store) == before
    return capsys.readouterr().err


@pytest.mark.parametrize("index", [1, 2])  # a gap, and the last shard (only collect.json knows)
def test_missing_shard_is_reported_and_refused(
    index: int, store: Path, tmp_path: Path, params: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.rmtree(store / f"shard-{index:05d}")
    code, text = _validate(store, capsys)
    assert code == 1 and f"shard-{index:05d}: missing" in text
    err = _refused(store, tmp_path, params, capsys)
    assert f"shard-{index:05d}" in err and "--allow-incomplete" in err
    assert build(store, tmp_path / "ds", params, "--allow-incomplete") == 0
    info = json.loads((tmp_path / "ds" / "meta" / "info.json").read_text())
    assert index not in info["source_shards"] and info["counts"]["shards"] == 2


def test_missing_shard_json_is_reported_and_refused(
    store: Path, tmp_path: Path, params: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (store / "shard-00001" / "shard.json").unlink()
    code, text = _validate(store, capsys)
    assert code == 1 and "shard-00001/shard.json: missing" in text
    assert "shard-00001/shard.json" in _refused(store, tmp_path, params, capsys)


def test_shard_copied_under_a_second_name(
    store: Path, tmp_path: Path, params: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shutil.copytree(store / "shard-00001", store / "shard-00003")
    code, text = _validate(store, capsys)
    assert code == 1
    assert "shard-00003/shard.json: the folder is shard 3 but its shard.json says" in text
    assert "shard-00003/episodes.parquet row 0: episode_id" in text  # duplicate episode ids
    err = _refused(store, tmp_path, params, capsys, "--allow-incomplete")
    assert "shard-00003" in err


def test_shard_renamed(
    store: Path, tmp_path: Path, params: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    (store / "shard-00001").rename(store / "shard-00007")
    code, text = _validate(store, capsys)
    assert code == 1 and "shard-00007/shard.json" in text and "shard-00001: missing" in text
    assert "shard-00007" in _refused(store, tmp_path, params, capsys, "--allow-incomplete")


def test_store_mixing_two_configs(
    store: Path, tmp_path: Path, params: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    other = tmp_path / "other"
    write_synthetic_store(other, branch_step=2, seed=7)  # same layout, another collection
    shutil.rmtree(store / "shard-00001")
    shutil.copytree(other / "shard-00001", store / "shard-00001")
    code, text = _validate(store, capsys)
    assert code == 1 and "shard-00001/shard.json: config_hash" in text
    assert "different configs" in text
    assert "different configs" in _refused(store, tmp_path, params, capsys, "--allow-incomplete")


def test_collected_store_records_its_plan(
    tmp_path: Path, params: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """The real collector: its record (collect.json) and the shard ledger make a lost last
    shard visible, which no shard folder left could show."""
    from addiffusion.collect.collector import collect
    from addiffusion.collect.config import CollectConfig
    from addiffusion.diffusion.backbone import save_tiny_pipeline
    from addiffusion.rewards.clip import save_tiny_clip

    models = tmp_path / "models"
    cfg = CollectConfig.from_dict(
        dict(
            model=str(save_tiny_pipeline(models / "tiny", 0)),
            scorer=str(save_tiny_clip(models / "tiny-clip", 0)),
            n_max=4,
            strides=[1, 2],
            n_prompts=4,
            seeds_per_prompt=1,
            shard_size=2,
            batch_size=2,
            device="cpu",
        )
    )
    store = tmp_path / "store"
    collect(cfg, store, progress=False)
    assert _validate(store, capsys)[0] == 0
    ledger = [json.loads(line) for line in (store / "shards.jsonl").read_text().splitlines()]
    assert [row["shard_index"] for row in ledger] == [0, 1]
    shutil.rmtree(store / "shard-00001")
    code, text = _validate(store, capsys)
    assert code == 1 and "shard-00001: missing" in text and "collect.json n_shards" in text


def test_store_manifest_refuses_another_config(tmp_path: Path) -> None:
    init_store(tmp_path, {"seed": 0, "n_max": 5}, 3)
    with pytest.raises(ValueError, match="seed = 0, this run has 1"):
        init_store(tmp_path, {"seed": 1, "n_max": 5}, 3)
    assert json.loads((tmp_path / "collect.json").read_text())["config"]["seed"] == 0


# --- 6. splits by prompt text --------------------------------------------------------------


def test_repeated_prompt_is_on_one_side_of_the_split(tmp_path: Path, params: Path) -> None:
    texts = [f"prompt {p}" for p in range(9)]
    texts[3] = "  PROMPT   0 "  # prompt 0 again (ids 0 and 3 are both train prompts)
    store = tmp_path / "store"
    write_synthetic_store(store, n_prompts=9, prompts=texts, branch_step=2)
    for seed in range(8):
        out = tmp_path / f"ds{seed}"
        p = tmp_path / f"params{seed}.yaml"
        p.write_text(yaml.safe_dump({"datasets": {"val_fraction": 0.5, "split_seed": seed}}))
        with pytest.warns(UserWarning, match="1 prompt\\(s\\) repeat"):
            assert build(store, out, p) == 0
        ep = pl.read_parquet(out / "data" / "episodes")
        sides = ep.filter(pl.col("prompt_id").is_in([0, 3]))["rl_split"].unique().to_list()
        assert len(sides) == 1, (seed, sides)
        info = json.loads((out / "meta" / "info.json").read_text())
        assert info["rl_split"]["by"] == "prompt_text"


def test_tree_helper_sees_content_changes(tmp_path: Path) -> None:
    (tmp_path / "a").write_text("x")
    before = tree(tmp_path)
    (tmp_path / "a").write_text("y")
    assert tree(tmp_path) != before
    assert hashlib.sha256(b"y").hexdigest() == tree(tmp_path)["a"]
