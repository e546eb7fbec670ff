"""``addiffusion distill``: its help, config errors that name the key, dvc.yaml's params lists."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import yaml

from addiffusion.cli import build_parser, run
from addiffusion.config import ConfigError, read_params
from addiffusion.distill.config import EVAL_KEYS, DistillConfig

REPO = Path(__file__).resolve().parents[2]


def test_help_points_a_newcomer_at_sd35(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        build_parser().parse_args(["distill", "--help"])
    out = capsys.readouterr().out
    assert "stabilityai/stable-diffusion-3.5-large" in out
    assert "student_init: pretrained" in out and "flowmatch-euler" in out


def _params(tmp_path: Path, **distill: object) -> Path:
    params = yaml.safe_load((REPO / "params.yaml").read_text())
    params["distill"].update(distill)
    path = tmp_path / "params.yaml"
    path.write_text(yaml.safe_dump(params))
    return path


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"n_steps": 0}, "distill.n_steps must be >= 1, got 0"),
        ({"kl_eta": "one"}, "distill.kl_eta must be a number"),
        ({"scheduler": "euler"}, "distill.scheduler must be one of ddim, flowmatch-euler"),
        ({"student": "x"}, "distill.student must be a pipeline exactly when student_init"),
        ({"student_cross_attention": [True]}, "distill.student_cross_attention must be one flag"),
        ({"offline_steps": 3}, "distill.offline_store must be a store exactly when"),
        ({"n_stepz": 3}, "unknown key distill.n_stepz"),
    ],
)
def test_bad_params_fail_with_the_key(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], change: dict, message: str
) -> None:
    path = _params(tmp_path, **change)
    with pytest.raises(ConfigError, match="distill"):
        DistillConfig.from_params(read_params(path))
    code = run(
        build_parser().parse_args(
            ["distill", "train", "--params", str(path), "--out", str(tmp_path / "o")]
        )
    )
    err = capsys.readouterr().err
    assert code == 2 and message in err and "Traceback" not in err
    assert not (tmp_path / "o").exists()


def test_params_yaml_section_loads() -> None:
    cfg = DistillConfig.from_params(read_params(REPO / "params.yaml"))
    assert cfg.student_init == "copy" and cfg.scheduler == "ddim"


def test_dvc_stages_list_every_key_they_read() -> None:
    stages = yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"]
    keys = {f.name for f in dataclasses.fields(DistillConfig)}
    train = {p.removeprefix("distill.") for p in stages["distill"]["params"]}
    evaluate = {p.removeprefix("distill.") for p in stages["distill_eval"]["params"]}
    assert train == keys - set(EVAL_KEYS) - {"scorer"}
    shared = {"teacher", "scheduler", "drop_components", "guidance_scale", "height", "width"}
    shared |= {"n_steps", "prompts", "n_prompts", "heldout_fraction", "seed", "device"}
    assert evaluate == shared | set(EVAL_KEYS) | {"scorer"}
    assert "addiffusion/distill/train.py" in stages["distill"]["deps"]
    assert "models/distill/student" in stages["distill_eval"]["deps"]
    assert not any(d.startswith("data/") for d in stages["distill"]["deps"])  # needs no collect
