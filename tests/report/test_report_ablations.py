"""``addiffusion report ablations``: ``dvc exp show --json`` -> markdown table and plot.

Offline and fast: a trimmed real ``dvc exp show --json`` (dvc 3.x, this project's reward and IQL
ablations; at the end of this file) and small synthetic ones in the same nesting.
"""

from __future__ import annotations

import copy
import io
import json
import math
import re
import sys
from pathlib import Path
from statistics import NormalDist
from typing import Any

import pytest

from addiffusion.cli import main
from addiffusion.config import UserError
from addiffusion.report import ablations
from addiffusion.report.ablations import (
    build_report,
    loads_exp_show,
    parse_exp_show,
    plot_report,
    to_markdown,
)

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
Z95 = NormalDist().inv_cdf(0.975)
RECIPE = (
    "dvc exp show --json > exps.json && addiffusion report ablations --input exps.json "
    "--out-md results/ablations.md --out-png results/ablations.png"
)


# ----------------------------------------------------------------------------- fixtures


def realistic_rows() -> list[dict[str, Any]]:
    """The real sample, trimmed: the workspace is a copy of the last experiment (iql-beta-3, as
    `dvc exp run` leaves it), the commit holds no results, c-nfe-0.1 ran, beta-30 is queued."""
    rows = json.loads(EXP_SHOW_JSON)
    tip = copy.deepcopy(rows[0])
    sha = "ccbaa9d099926bec71a50ce16ed8301fcb254517"
    tip.update(rev=sha, name="iql-beta-3")
    tip["data"].update(rev=sha, timestamp="2026-12-06T03:03:52")
    rows[1]["experiments"].insert(0, {"revs": [tip], "executor": None, "name": "iql-beta-3"})
    return rows


def method(
    nfe: float,
    verifier: float,
    *,
    kind: str = "policy",
    n: int = 100,
    gain: float | None = None,
    ci: bool = False,
) -> dict[str, Any]:
    """A method's entry of results/eval/metrics.json; ``ci``: with the bootstrap CIs."""
    entry: dict[str, Any] = {
        "kind": kind,
        "n": n,
        "nfe": nfe,
        "nfe_std": 1.0,
        "clip_score": 0.7,
        "clip_score_std": 0.1,
        "verifier": verifier,
        "verifier_std": 0.5,
    }
    if ci:
        entry.update(nfe_ci=[nfe - 0.25, nfe + 0.5], verifier_ci=[verifier - 0.05, verifier + 0.1])
    if gain is not None:
        entry["frontier"] = {"method": "x", "gain": gain}
        if ci:
            entry["frontier"]["ci"] = [gain - 0.02, gain + 0.03]
    return entry


def eval_metrics(
    methods: dict[str, dict[str, Any]], headline: str = "iql", metric: str = "verifier"
) -> dict[str, Any]:
    fixed = {
        "ddim-2": method(2.0, 0.3, kind="baseline"),
        "ddim-4": method(4.0, 0.6, kind="baseline"),
        "ddim-8": method(8.0, 0.7, kind="baseline"),
        "patience-2": method(3.0, 0.4, kind="heuristic"),
    }
    return {**fixed, **methods, "frontier": {"metric": metric, "method": headline, "gain": 0.0}}


def state(
    rev: str,
    name: str | None,
    params: dict[str, Any],
    metrics: dict[str, Any] | None,
    *,
    error: dict[str, str] | None = None,
) -> dict[str, Any]:
    """One experiment state as dvc exp show --json writes it."""
    files: dict[str, Any] = {}
    if metrics is not None:
        files["results/eval/metrics.json"] = {"data": metrics}
    elif error is not None:
        files["results/eval/metrics.json"] = {"error": error}
    return {
        "rev": rev,
        "name": name,
        "data": {
            "rev": rev,
            "timestamp": None,
            "params": {"params.yaml": {"data": params}},
            "metrics": files,
            "deps": {},
            "outs": {},
            "meta": {},
        },
        "error": None,
        "experiments": None,
    }


def params(c_nfe: float = 0.05, beta: float = 10.0, confidence: float = 0.95) -> dict[str, Any]:
    return {
        "rewards": {"weights": {"verifier": 1.0, "clip_score": 0.5}, "c_nfe": c_nfe},
        "offline_rl": {"algo": "iql", "beta": beta, "hidden_units": [128, 128]},
        "eval": {"confidence": confidence},
    }


def exp_show(
    baseline: dict[str, Any] | None,
    experiments: list[tuple[dict[str, Any], str | None]],
    workspace: dict[str, Any] | None = None,
) -> list[dict[str, Any]]:
    """Workspace row, then the commit row with its experiments (state, executor state)."""
    sha = "b796f63801d781ab26fe895805561d31cafe7887"
    head = baseline or state(sha, "main", params(), None)
    head = {**head, "rev": sha, "name": "main"}
    head["experiments"] = [
        {
            "revs": [s],
            "executor": None if st is None else {"state": st, "name": "dvc-task", "local": None},
            "name": s["name"],
        }
        for s, st in experiments
    ]
    ws = workspace or {**state("workspace", None, params(), None), "rev": "workspace"}
    return [ws, head]


def synthetic(**kw: Any) -> list[dict[str, Any]]:
    """A baseline commit with results and two experiments (c_nfe 0.1; beta 3)."""
    base = state(
        "b796f63801d781ab26fe895805561d31cafe7887",
        "main",
        params(),
        eval_metrics({"iql": method(5.0, 0.6, gain=-0.1, **kw), "ppo": method(6.0, 0.65, **kw)}),
    )
    a = state(
        "d46f24378e4eee888836666de1cab18d1d130e77",
        "c-nfe-0.1",
        params(c_nfe=0.1),
        eval_metrics({"iql": method(4.5, 0.55, gain=-0.12, **kw), "ppo": method(5.5, 0.6, **kw)}),
    )
    b = state(
        "6e1e1362918ae64ef70f16123a0f609043733892",
        None,  # unnamed: shown by its rev
        params(beta=3.0),
        eval_metrics({"iql": method(5.2, 0.64, gain=-0.07, **kw)}, headline="iql"),
    )
    return exp_show(base, [(a, None), (b, None)])


def table_rows(markdown: str) -> list[list[str]]:
    """The table's cells, header first (without the separator line)."""
    lines = [line for line in markdown.splitlines() if line.startswith("|")]
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[:1] + lines[2:]]


def report_of(rows: list[dict[str, Any]], **kw: Any) -> ablations.AblationReport:
    return build_report(parse_exp_show(rows), **kw)


# ----------------------------------------------------------------------------- the real sample


def test_real_sample_rows_skips_and_params() -> None:
    exps = parse_exp_show(realistic_rows())
    assert [e.label for e in exps.experiments] == ["iql-beta-3", "c-nfe-0.1"]
    assert [(s.label, s.reason) for s in exps.skipped] == [
        ("workspace", "same params and metrics as iql-beta-3"),
        ("baseline (b796f63)", "no results/eval/metrics.json (FileNotFoundError)"),
        ("beta-30", "queued"),
    ]
    report = build_report(exps)
    assert report.methods == ("iql", "bc")  # the policies; bc is also the headline
    assert report.metric == "verifier" and report.gain_metric == "verifier"
    assert report.param_keys == ("rewards.c_nfe", "offline_rl.beta")


def test_real_sample_table_numbers_and_cis() -> None:
    md = to_markdown(report_of(realistic_rows()))
    cells = table_rows(md)
    assert cells[0] == [
        "experiment",
        "`rewards.c_nfe`",
        "`offline_rl.beta`",
        "method",
        "NFE [95% CI]",
        "verifier [95% CI]",
        "gain vs frontier (verifier) [95% CI]",
    ]
    # No <m>_ci in this (older) metrics file: mean ± 1.96·std/√n, marked †.
    half = Z95 * 2.2987992695312096 / math.sqrt(192)
    nfe = 5.182291666666667
    assert cells[1] == [
        "iql-beta-3",
        "0.05",
        "3",
        "iql",
        f"{nfe:.2f} [{nfe - half:.2f}, {nfe + half:.2f}]†",
        "0.641 [0.587, 0.695]†",
        "-0.074",  # no CI recorded for a non-headline gain
    ]
    # bc is the headline (bold); its gain CI comes from the headline's line.
    assert cells[2] == ["", "", "", "**bc**", "2.19 [2.04, 2.35]†", "0.252 [0.205, 0.299]†"] + [
        "-0.031 [-0.073, +0.010]"
    ]
    assert cells[3] == [
        "c-nfe-0.1",
        "0.1",
        "10",
        "iql",
        "4.53 [4.33, 4.73]†",
        "0.578 [0.521, 0.636]†",
        "-0.102",
    ]
    assert len(cells) == 5
    assert "normal approximation" in md
    assert "Skipped 3 row(s): workspace: same params and metrics as iql-beta-3;" in md
    assert "beta-30: queued" in md


# ----------------------------------------------------------------------------- table


def test_bootstrap_cis_are_used_when_present() -> None:
    md = to_markdown(report_of(synthetic(ci=True)))
    cells = table_rows(md)
    assert [c[0] for c in cells[1:]] == ["baseline (b796f63)", "", "c-nfe-0.1", "", "6e1e136"]
    assert cells[1][3:] == ["**iql**", "5.00 [4.75, 5.50]", "0.600 [0.550, 0.700]"] + [
        "-0.100 [-0.120, -0.070]"
    ]
    assert cells[2][3:] == ["ppo", "6.00 [5.75, 6.50]", "0.650 [0.600, 0.750]", "–"]
    assert "†" not in md and "normal approximation" not in md
    assert "95% prompt-cluster bootstrap" in md


def test_normal_approximation_uses_the_experiments_confidence() -> None:
    rows = synthetic()
    rows[1]["data"]["params"]["params.yaml"]["data"]["eval"]["confidence"] = 0.9
    report = report_of(rows)
    iql = report.rows[0].results[0]
    z90 = NormalDist().inv_cdf(0.95)
    assert iql.nfe is not None and iql.nfe.approx
    assert iql.nfe.lo == pytest.approx(5.0 - z90 * 1.0 / 10.0)
    assert report.confidences == (0.9, 0.95)
    header = table_rows(to_markdown(report))[0]
    assert "NFE [CI]" in header  # two levels: no single percentage in the header
    assert "90% / 95%" in to_markdown(report)


def test_default_params_are_those_that_differ() -> None:
    report = report_of(synthetic())
    assert report.param_keys == ("rewards.c_nfe", "offline_rl.beta")
    cells = table_rows(to_markdown(report))
    assert [c[1:3] for c in cells[1:] if c[0]] == [["0.05", "10"], ["0.1", "10"], ["0.05", "3"]]


def test_params_option_picks_columns_and_rejects_unknown_keys() -> None:
    report = report_of(synthetic(), params=["offline_rl.hidden_units", "rewards.weights.verifier"])
    cells = table_rows(to_markdown(report))
    assert cells[0][1:3] == ["`offline_rl.hidden_units`", "`rewards.weights.verifier`"]
    assert cells[1][1:3] == ["[128, 128]", "1"]
    with pytest.raises(UserError, match=r"--params: rewards\.c_nf not a param.*rewards\.c_nfe"):
        report_of(synthetic(), params=["rewards.c_nf"])


def test_methods_default_and_option() -> None:
    rows = synthetic()
    # A headline that is not a policy is still shown, after the policies.
    rows[1]["data"]["metrics"]["results/eval/metrics.json"]["data"]["frontier"]["method"] = (
        "patience-2"
    )
    assert report_of(rows).methods == ("iql", "ppo", "patience-2")
    report = report_of(synthetic(), methods=["ppo"])
    assert report.methods == ("ppo",)
    cells = table_rows(to_markdown(report))
    # 6e1e136 has no ppo: one row that says so.
    assert cells[-1][0] == "6e1e136" and cells[-1][3] == "(none of ppo)"
    with pytest.raises(UserError, match=r"--methods: sac not in any experiment.*iql, ppo"):
        report_of(synthetic(), methods=["iql", "sac"])
    with pytest.raises(UserError, match=r"--methods names no method"):
        report_of(synthetic(), methods=[])


def test_metric_option() -> None:
    report = report_of(synthetic(), metric="clip_score")
    cells = table_rows(to_markdown(report))
    assert cells[0][5] == "clip_score [95% CI]"
    assert cells[0][6] == "gain vs frontier (verifier) [95% CI]"  # the gain keeps its metric
    assert cells[1][5] == f"0.700 [{0.7 - Z95 * 0.01:.3f}, {0.7 + Z95 * 0.01:.3f}]†"
    with pytest.raises(UserError, match=r"no method has 'pickscore'.*clip_score, verifier"):
        report_of(synthetic(), metric="pickscore")


def test_metric_falls_back_to_clip_score() -> None:
    rows = synthetic()
    for s in [rows[1], *(e["revs"][0] for e in rows[1]["experiments"])]:
        del s["data"]["metrics"]["results/eval/metrics.json"]["data"]["frontier"]["metric"]
    report = report_of(rows)
    assert report.metric == "clip_score" and report.gain_metric is None


def test_seed_summaries_add_a_column() -> None:
    rows = synthetic()
    data = rows[1]["data"]["metrics"]["results/eval/metrics.json"]["data"]
    data["learned"] = {
        "seeds": {
            "iql": {
                "n_seeds": 3,
                "nfe_mean": 4.5,
                "nfe_std": 0.2,
                "verifier_mean": 0.6,
                "verifier_std": 0.01,
                "gain_mean": -0.05,
                "gain_std": 0.02,
            }
        }
    }
    report = report_of(rows)
    assert report.methods == ("iql", "ppo")  # "learned" is not a method
    cells = table_rows(to_markdown(report))
    assert cells[0][-1] == "over seeds: NFE / verifier / gain (mean ± std)"
    assert cells[1][-1] == "4.50 ± 0.20 / 0.600 ± 0.010 / -0.050 ± 0.020 (n=3)"
    assert cells[2][-1] == "–"  # ppo: not run over seeds
    assert "Over seeds" in to_markdown(report)
    assert "over seeds" not in to_markdown(report_of(synthetic()))


def test_skipped_experiments_are_listed() -> None:
    ok = state("a" * 40, "ok", params(), eval_metrics({"iql": method(5.0, 0.6)}))
    failed = state("b" * 40, "crashed", params(beta=1.0), None)
    running = state("c" * 40, "busy", params(beta=2.0), eval_metrics({"iql": method(1, 0.1)}))
    broken = {**state("d" * 40, "broken", params(), None), "error": {"type": "SCMError"}}
    no_file = state("e" * 40, "old", params(), None, error={"type": "FileNotFoundError"})
    rows = exp_show(
        None,
        [(ok, None), (failed, "failed"), (running, "running"), (broken, None), (no_file, None)],
    )
    exps = parse_exp_show(rows)
    assert [e.label for e in exps.experiments] == ["ok"]
    assert [(s.label, s.reason) for s in exps.skipped] == [
        ("workspace", "no results/eval/metrics.json"),
        ("baseline (b796f63)", "no results/eval/metrics.json"),
        ("crashed", "failed"),
        ("busy", "running"),
        ("broken", "error: SCMError"),
        ("old", "no results/eval/metrics.json (FileNotFoundError)"),
    ]
    md = to_markdown(build_report(exps))
    assert "Skipped 6 row(s): workspace: no results/eval/metrics.json; " in md
    assert "crashed: failed; busy: running" in md


def test_a_workspace_with_its_own_results_comes_first() -> None:
    rows = synthetic()
    rows[0] = {
        **state("workspace", None, params(c_nfe=0.2), eval_metrics({"iql": method(3, 0.5)})),
        "rev": "workspace",
    }
    report = report_of(rows)
    assert [r.experiment.label for r in report.rows][:2] == ["workspace", "baseline (b796f63)"]


# ----------------------------------------------------------------------------- input errors


def test_metrics_file_absent_from_every_row_names_the_files_found() -> None:
    rows = synthetic()
    with pytest.raises(
        UserError, match=r"no row .* has the metrics file results/x\.json .*found: results/eval"
    ):
        parse_exp_show(rows, "results/x.json")


def test_no_usable_row() -> None:
    rows = exp_show(None, [(state("a" * 40, "q", params(), None), "queued")])
    rows[1]["data"]["metrics"] = {"results/eval/metrics.json": {"error": {"type": "FileNotFound"}}}
    with pytest.raises(UserError, match=r"no row .* has usable .*: skipped .*q: queued"):
        parse_exp_show(rows)


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("not json", r"is not JSON"),
        ('{"workspace": {}}', r"not `dvc exp show --json` output .*dvc 2\.x"),
        ("[1, 2]", r"not `dvc exp show --json` output"),
        ('"x"', r"got a JSON str"),
    ],
)
def test_bad_input_is_a_user_error(text: str, message: str) -> None:
    with pytest.raises(UserError, match=message):
        loads_exp_show(text, "exps.json")


# ----------------------------------------------------------------------------- plot


def test_plot_is_a_png(tmp_path: Path) -> None:
    out = plot_report(report_of(realistic_rows()), tmp_path / "sub" / "ablations.png")
    assert out.read_bytes()[:8] == PNG_MAGIC
    out = plot_report(report_of(synthetic(ci=True)), tmp_path / "ci.png")
    assert out.read_bytes()[:8] == PNG_MAGIC


# ----------------------------------------------------------------------------- CLI


def _input(tmp_path: Path, rows: Any) -> Path:
    path = tmp_path / "exps.json"
    path.write_text(json.dumps(rows))
    return path


def test_cli_writes_markdown_and_png(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    md, png = tmp_path / "results" / "ablations.md", tmp_path / "results" / "ablations.png"
    argv = ["--input", str(_input(tmp_path, realistic_rows()))]
    assert main(["report", "ablations", *argv, "--out-md", str(md), "--out-png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "2 experiment(s)" in out and "skipped 3 row(s)" in out and str(md) in out
    assert md.read_text().startswith("| experiment | `rewards.c_nfe` |")
    assert png.read_bytes()[:8] == PNG_MAGIC


def test_cli_prints_the_table_without_out_md(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _input(tmp_path, synthetic())
    argv = ["report", "ablations", "--input", str(path), "--methods", "iql", "--params", ""]
    assert main(argv) == 0
    captured = capsys.readouterr()
    assert captured.out.startswith("| experiment | method | NFE [95% CI] |")
    assert "report ablations: 3 experiment(s)" in captured.err
    assert not list(tmp_path.glob("*.png"))


def test_cli_reads_stdin(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(json.dumps(realistic_rows())))
    assert main(["report", "ablations", "--input", "-"]) == 0
    assert "| iql-beta-3 |" in capsys.readouterr().out


def test_cli_runs_dvc_without_input(
    monkeypatch: pytest.MonkeyPatch, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _input(tmp_path, synthetic())
    fake = [sys.executable, "-c", f"import sys; sys.stdout.write(open({str(path)!r}).read())"]
    monkeypatch.setattr(ablations, "dvc_command", lambda: fake)
    assert main(["report", "ablations"]) == 0
    assert "| c-nfe-0.1 |" in capsys.readouterr().out


@pytest.mark.parametrize(
    ("command", "message"),
    [
        (None, "`dvc exp show --json` cannot run: dvc is not installed"),
        (
            [
                sys.executable,
                "-c",
                "import sys; sys.stderr.write('ERROR: you are not inside of a DVC repository\\n');"
                " sys.exit(253)",
            ],
            "`dvc exp show --json` failed in .* \\(exit status 253\\): ERROR: you are not inside",
        ),
    ],
)
def test_cli_dvc_errors(
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    command: list[str] | None,
    message: str,
) -> None:
    monkeypatch.setattr(ablations, "dvc_command", lambda: command)
    assert main(["report", "ablations"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("addiffusion: error: ")
    assert re.search(message, err)


@pytest.mark.parametrize(
    ("content", "argv", "message"),
    [
        (None, [], "no such file"),
        ("{oops", [], "is not JSON"),
        ("\udcff", [], "is not JSON text"),
        ("[]", [], "has the metrics file results/eval/metrics.json"),
        ("ROWS", ["--metrics", "results/x.json"], "metrics files found: results/eval/metrics.json"),
        ("ROWS", ["--methods", "sac"], "--methods: sac not in any experiment"),
        ("ROWS", ["--metric", "nope"], "--metric: no method has 'nope'"),
    ],
)
def test_cli_bad_input_exits_2_with_one_line(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    content: str | None,
    argv: list[str],
    message: str,
) -> None:
    path = tmp_path / "exps.json"
    if content is not None:
        text = json.dumps(synthetic()) if content == "ROWS" else content
        path.write_bytes(text.encode("utf-8", "surrogateescape"))
    assert main(["report", "ablations", "--input", str(path), *argv]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.startswith("addiffusion: error: ") and message in err


def test_help_shows_the_recipe(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as exit_:
        main(["report", "ablations", "--help"])
    assert exit_.value.code == 0
    out = capsys.readouterr().out
    assert RECIPE in out
    for option in ("--input", "--metrics", "--methods", "--metric", "--params", "--out-md"):
        assert option in out


# A trimmed `dvc exp show --json` of this project (dvc 3.x): the workspace (IQL beta 3, the last
# `dvc exp run`), the commit without results, c-nfe-0.1 and a queued beta-30; two fixed schedules
# and two policies each. realistic_rows() adds iql-beta-3, the workspace's twin.
EXP_SHOW_JSON = """
[
 {
  "rev": "workspace",
  "name": null,
  "data": {
   "rev": "workspace",
   "timestamp": null,
   "params": {
    "params.yaml": {
     "data": {
      "rewards": {
       "weights": {"verifier": 1.0, "clip_score": 0.5, "stability": 0.0},
       "c_nfe": 0.05,
       "terminal_bonus": 1.0,
       "normalize": true
      },
      "offline_rl": {"algo": "iql", "baselines": ["cql", "bc"], "beta": 3.0, "seed": 0},
      "eval": {"n_prompts": 96, "confidence": 0.95}
     }
    }
   },
   "metrics": {
    "results/eval/metrics.json": {
     "data": {
      "ddim-2": {
       "kind": "baseline",
       "n": 192,
       "nfe": 2.0,
       "nfe_std": 0.0,
       "verifier": 0.2417534732570251,
       "verifier_std": 0.3315446692469506
      },
      "ddim-4": {
       "kind": "baseline",
       "n": 192,
       "nfe": 4.0,
       "nfe_std": 0.0,
       "verifier": 0.646701390001302,
       "verifier_std": 0.38211702950625964
      },
      "iql": {
       "kind": "policy",
       "n": 192,
       "nfe": 5.182291666666667,
       "nfe_std": 2.2987992695312096,
       "clip_score": 0.785583363690724,
       "clip_score_std": 0.12310133414448989,
       "verifier": 0.6410590288384507,
       "verifier_std": 0.3832460356468725,
       "frontier": {
        "method": "iql",
        "frontier": 0.7153365536004356,
        "gain": -0.0742775247619849,
        "frontier_label": "euler-5..euler-ays-6 (w=0.18)"
       }
      },
      "bc": {
       "kind": "policy",
       "n": 192,
       "nfe": 2.1927083333333335,
       "nfe_std": 1.0941839416953114,
       "clip_score": 0.5388757853555338,
       "clip_score_std": 0.23423623025547272,
       "verifier": 0.25173611224939424,
       "verifier_std": 0.33147903678432733,
       "frontier": {
        "method": "bc",
        "frontier": 0.28248652811412794,
        "gain": -0.030750415864733704,
        "frontier_label": "ddim-2..euler-3 (w=0.19)"
       }
      },
      "frontier": {
       "metric": "verifier",
       "method": "bc",
       "gain": -0.030750415864733704,
       "line": "frontier: method=bc nfe=2.19 verifier=0.252 frontier=0.282 gain=-0.031 ci=[-0.073,0.010] nfe_ratio=0.731 oracle_ratio=1.955"
      }
     }
    },
    "models/offline_rl/metrics.json": {"data": {"algo": "iql"}}
   },
   "deps": {},
   "outs": {},
   "meta": {}
  },
  "error": null,
  "experiments": null
 },
 {
  "rev": "b796f63801d781ab26fe895805561d31cafe7887",
  "name": "main",
  "data": {
   "rev": "b796f63801d781ab26fe895805561d31cafe7887",
   "timestamp": "2026-12-06T02:17:43",
   "params": {
    "params.yaml": {
     "data": {
      "rewards": {
       "weights": {"verifier": 1.0, "clip_score": 0.5, "stability": 0.0},
       "c_nfe": 0.05,
       "terminal_bonus": 1.0,
       "normalize": true
      },
      "offline_rl": {"algo": "iql", "baselines": ["cql", "bc"], "beta": 10.0, "seed": 0},
      "eval": {"n_prompts": 96, "confidence": 0.95}
     }
    }
   },
   "metrics": {
    "results/eval/metrics.json": {
     "error": {
      "type": "FileNotFoundError",
      "msg": "[Errno 2] No such file or directory: 'results/eval/metrics.json'"
     }
    },
    "models/offline_rl/metrics.json": {
     "error": {
      "type": "FileNotFoundError",
      "msg": "[Errno 2] No such file or directory: 'models/offline_rl/metrics.json'"
     }
    }
   },
   "deps": {},
   "outs": {},
   "meta": {}
  },
  "error": null,
  "experiments": [
   {
    "revs": [
     {
      "rev": "d46f24378e4eee888836666de1cab18d1d130e77",
      "name": "c-nfe-0.1",
      "data": {
       "rev": "d46f24378e4eee888836666de1cab18d1d130e77",
       "timestamp": "2026-12-06T02:55:26",
       "params": {
        "params.yaml": {
         "data": {
          "rewards": {
           "weights": {"verifier": 1.0, "clip_score": 0.5, "stability": 0.0},
           "c_nfe": 0.1,
           "terminal_bonus": 1.0,
           "normalize": true
          },
          "offline_rl": {"algo": "iql", "baselines": ["cql", "bc"], "beta": 10.0, "seed": 0},
          "eval": {"n_prompts": 96, "confidence": 0.95}
         }
        }
       },
       "metrics": {
        "results/eval/metrics.json": {
         "data": {
          "ddim-2": {
           "kind": "baseline",
           "n": 192,
           "nfe": 2.0,
           "nfe_std": 0.0,
           "verifier": 0.2417534732570251,
           "verifier_std": 0.3315446692469506
          },
          "ddim-4": {
           "kind": "baseline",
           "n": 192,
           "nfe": 4.0,
           "nfe_std": 0.0,
           "verifier": 0.646701390001302,
           "verifier_std": 0.38211702950625964
          },
          "iql": {
           "kind": "policy",
           "n": 192,
           "nfe": 4.53125,
           "nfe_std": 1.4394235318927735,
           "clip_score": 0.7713325472820239,
           "clip_score_std": 0.14737327520383986,
           "verifier": 0.5781250016298145,
           "verifier_std": 0.40679495092247947,
           "frontier": {
            "method": "iql",
            "frontier": 0.6804334863966991,
            "gain": -0.10230848476688459,
            "frontier_label": "euler-4..euler-5 (w=0.53)"
           }
          },
          "bc": {
           "kind": "policy",
           "n": 192,
           "nfe": 2.1927083333333335,
           "nfe_std": 1.0941839416953114,
           "clip_score": 0.5388757853555338,
           "clip_score_std": 0.23423623025547272,
           "verifier": 0.25173611224939424,
           "verifier_std": 0.33147903678432733,
           "frontier": {
            "method": "bc",
            "frontier": 0.28248652811412794,
            "gain": -0.030750415864733704,
            "frontier_label": "ddim-2..euler-3 (w=0.19)"
           }
          },
          "frontier": {
           "metric": "verifier",
           "method": "bc",
           "gain": -0.030750415864733704,
           "line": "frontier: method=bc nfe=2.19 verifier=0.252 frontier=0.282 gain=-0.031 ci=[-0.073,0.010] nfe_ratio=0.731 oracle_ratio=1.955"
          }
         }
        },
        "models/offline_rl/metrics.json": {"data": {"algo": "iql"}}
       },
       "deps": {},
       "outs": {},
       "meta": {}
      },
      "error": null,
      "experiments": null
     }
    ],
    "executor": null,
    "name": "c-nfe-0.1"
   },
   {
    "revs": [
     {
      "rev": "4f1c2e9a0b7d6c5e4f3a2b1c0d9e8f7a6b5c4d3e",
      "name": "beta-30",
      "data": {
       "rev": "4f1c2e9a0b7d6c5e4f3a2b1c0d9e8f7a6b5c4d3e",
       "timestamp": null,
       "params": {
        "params.yaml": {
         "data": {
          "rewards": {
           "weights": {"verifier": 1.0, "clip_score": 0.5, "stability": 0.0},
           "c_nfe": 0.1,
           "terminal_bonus": 1.0,
           "normalize": true
          },
          "offline_rl": {"algo": "iql", "baselines": ["cql", "bc"], "beta": 30.0, "seed": 0},
          "eval": {"n_prompts": 96, "confidence": 0.95}
         }
        }
       },
       "metrics": {},
       "deps": {},
       "outs": {},
       "meta": {}
      },
      "error": null,
      "experiments": null
     }
    ],
    "executor": {"state": "queued", "name": "dvc-task", "local": null},
    "name": "beta-30"
   }
  ]
 }
]"""


def test_full_metrics_come_from_the_experiments_git_refs(tmp_path: Path) -> None:
    """`dvc exp show` drops list values (the CIs): with a repo, each experiment's metrics file
    is read whole from its git ref, the workspace's from the file itself."""
    import subprocess

    repo = tmp_path / "repo"
    (repo / "results" / "eval").mkdir(parents=True)
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run([*git, "init", "-q"], check=True)
    full = eval_metrics({"iql": method(4.5, 0.55, gain=-0.12, ci=True)})
    (repo / "results" / "eval" / "metrics.json").write_text(json.dumps(full))
    subprocess.run([*git, "add", "-A"], check=True)
    subprocess.run([*git, "commit", "-qm", "exp"], check=True)
    rev = subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    shown = eval_metrics({"iql": method(4.5, 0.55, gain=-0.12)})  # what dvc keeps: no lists
    rows = exp_show(None, [(state(rev, "exp", params(), shown), None)])
    exps = parse_exp_show(rows)
    assert "nfe_ci" not in exps.experiments[0].metrics["iql"]
    whole = ablations.with_full_metrics(exps, repo)
    assert whole.experiments[0].metrics["iql"]["nfe_ci"] == [4.25, 5.0]
    md = to_markdown(build_report(whole, methods=["iql"]))
    assert "4.50 [4.25, 5.00]" in md and "-0.120 [-0.140, -0.090]" in md and "†" not in md
    # A rev the repo does not have keeps what dvc exp show gave.
    other = parse_exp_show(exp_show(None, [(state("f" * 40, "exp", params(), shown), None)]))
    assert ablations.with_full_metrics(other, repo).experiments[0].metrics == shown
