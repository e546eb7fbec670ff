"""Ablation report: ``dvc exp show --json`` -> a markdown table and a plot of every experiment's
held-out NFE and quality, with confidence intervals.

Input: the JSON of ``dvc exp show --json`` (dvc 3.x), a list of rows, one per commit (the first is
the workspace); each row's ``experiments`` holds the experiments run on that commit::

    [{"rev": "workspace", "name": null, "error": null, "experiments": null,
      "data": {"params": {"params.yaml": {"data": {...}}},
               "metrics": {"results/eval/metrics.json": {"data": {...}}}, ...}},
     {"rev": "<sha>", "name": "main", "data": {...},
      "experiments": [{"name": "c-nfe-0.1", "executor": null,
                       "revs": [{"rev": "<sha>", "name": "c-nfe-0.1", "data": {...}}]}]}]

Every row with the eval metrics is an experiment of the report: the workspace (unless its params
and metrics are those of another row, as after ``dvc exp run``), each commit (``baseline
(<sha7>)``) and each experiment (its name); the others (queued, running or failed experiments,
commits without results) are listed as skipped, with the reason.

Per experiment and method, ``metrics[method]`` (``results/eval/metrics.json``, written by
``addiffusion eval``) gives ``nfe``, ``<metric>`` (means over the held-out images), their CIs
``<m>_ci = [lo, hi]`` (prompt-cluster bootstrap) or, without those, ``<m>_std`` and ``n`` (the CI is
then the normal approximation ``mean ± z·std/√n``, marked †), and ``frontier = {"gain", "ci"}``:
the gain over the fixed-schedule frontier at the method's NFE. ``metrics["frontier"]`` names the
headline method; optional ``metrics["learned"]["seeds"][method]`` summarises runs over training seeds
(``n_seeds``, ``<m>_mean``, ``<m>_std`` for m in nfe, the metric and gain).

:func:`read_exp_show` reads (or runs) ``dvc exp show --json``, :func:`parse_exp_show` finds the
experiments, :func:`build_report` picks methods, metric and parameter columns, and
:func:`to_markdown` / :func:`plot_report` write the table and the PNG. Input the user can fix is a
:class:`~addiffusion.config.UserError`.
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from statistics import NormalDist
from typing import Any

from addiffusion.config import UserError

METRICS_PATH = "results/eval/metrics.json"
"""The metrics file of ``addiffusion eval`` (dvc.yaml's eval stage)."""
PARAMS_FILE = "params.yaml"
"""Params of this file are shown as dotted keys (``rewards.c_nfe``); other files' keys get a
``<file>:`` prefix."""
DEFAULT_METRIC = "clip_score"
"""The quality metric when neither ``--metric`` nor the metrics' ``frontier.metric`` names one."""
DEFAULT_CONFIDENCE = 0.95
"""The CI level when an experiment's params have no ``eval.confidence``."""
DVC_EXP_SHOW = "dvc exp show --json"
SKIP_STATES = ("queued", "running", "failed")
"""Experiment executor states without (final) results."""
MISSING = "–"


# ----------------------------------------------------------------------------- reading


def read_exp_show(source: str | Path | None = None, cwd: Path | None = None) -> list[Any]:
    """The rows of ``dvc exp show --json``: from the file ``source``, from stdin when ``source``
    is ``"-"``, or, when ``source`` is None, from running ``dvc exp show --json`` in ``cwd``."""
    if source is None:
        text, origin = run_exp_show(cwd), f"the output of `{DVC_EXP_SHOW}`"
    elif str(source) == "-":
        text, origin = sys.stdin.read(), "stdin"
    else:
        path = Path(source)
        if not path.is_file():
            raise UserError(
                f"{path}: no such file (--input takes a saved `{DVC_EXP_SHOW}`, or - for stdin)"
            )
        try:
            text, origin = path.read_text(encoding="utf-8"), str(path)
        except UnicodeDecodeError as e:
            raise UserError(
                f"{path} is not JSON text ({e.reason}): expected a saved `{DVC_EXP_SHOW}`"
            ) from e
    return loads_exp_show(text, origin)


def loads_exp_show(text: str, origin: str = "input") -> list[Any]:
    """``text`` parsed as ``dvc exp show --json`` output; :class:`UserError` naming ``origin``
    when it is not JSON or not a list of rows."""
    try:
        rows = json.loads(text)
    except json.JSONDecodeError as e:
        raise UserError(
            f"{origin} is not JSON ({e.msg} at line {e.lineno} column {e.colno}): expected the "
            f"output of `{DVC_EXP_SHOW}`"
        ) from e
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "rev" in r for r in rows):
        got = (
            "a JSON object (dvc 2.x wrote one; save it with dvc 3)"
            if isinstance(rows, dict)
            else f"a JSON {type(rows).__name__}"
            if not isinstance(rows, list)
            else "a list whose items are not rows with a 'rev'"
        )
        raise UserError(
            f"{origin} is not `{DVC_EXP_SHOW}` output (dvc 3.x: a list of rows with 'rev', "
            f"'data' and 'experiments'): got {got}"
        )
    return rows


def dvc_command() -> list[str] | None:
    """The command line running ``dvc exp show --json``: ``dvc`` on PATH, else the one beside
    this Python (an unactivated virtual environment), else ``python -m dvc``; None without dvc."""
    args = DVC_EXP_SHOW.split()[1:]
    exe = shutil.which("dvc")
    if exe is None:
        sibling = Path(sys.executable).with_name("dvc")
        exe = str(sibling) if sibling.is_file() else None
    if exe is not None:
        return [exe, *args]
    if importlib.util.find_spec("dvc") is not None:
        return [sys.executable, "-m", "dvc", *args]
    return None


def run_exp_show(cwd: Path | None = None) -> str:
    """The stdout of ``dvc exp show --json`` run in ``cwd``; :class:`UserError` naming the
    command when dvc is missing or fails."""
    command = dvc_command()
    where = Path(cwd) if cwd is not None else Path.cwd()
    if command is None:
        raise UserError(
            f"`{DVC_EXP_SHOW}` cannot run: dvc is not installed (pip install dvc); or pass "
            f"--input FILE, a saved `{DVC_EXP_SHOW}`"
        )
    try:
        done = subprocess.run(command, cwd=where, capture_output=True, text=True, check=False)
    except OSError as e:
        raise UserError(f"`{DVC_EXP_SHOW}` cannot run in {where}: {e}") from e
    if done.returncode != 0:
        lines = [line.strip() for line in done.stderr.splitlines() if line.strip()]
        errors = [line for line in lines if line.startswith("ERROR")]
        why = (errors or lines or ["no message"])[-1]
        raise UserError(
            f"`{DVC_EXP_SHOW}` failed in {where} (exit status {done.returncode}): {why}"
        )
    return done.stdout


# ----------------------------------------------------------------------------- experiments


@dataclass(frozen=True)
class Experiment:
    """One row of ``dvc exp show`` with eval metrics."""

    label: str
    """``workspace``, ``baseline (<sha7>)`` (a commit) or the experiment's name."""
    rev: str
    kind: str
    """``workspace``, ``baseline`` or ``experiment``."""
    params: dict[str, Any]
    """Flattened params: ``{"rewards.c_nfe": 0.1, ...}``."""
    metrics: dict[str, Any]
    """The metrics file's content."""


@dataclass(frozen=True)
class Skipped:
    """A row without (usable) metrics and why."""

    label: str
    reason: str


@dataclass(frozen=True)
class ExpShow:
    experiments: tuple[Experiment, ...]
    skipped: tuple[Skipped, ...]
    metrics_path: str


def parse_exp_show(rows: Sequence[Any], metrics_path: str = METRICS_PATH) -> ExpShow:
    """The experiments of ``dvc exp show --json`` rows that have ``metrics_path``, in the JSON's
    order (workspace, each commit then its experiments), and the rows skipped.

    :class:`UserError` when no row has ``metrics_path`` (naming the metrics files found) or none
    has usable metrics (naming the skipped rows)."""
    experiments: list[Experiment] = []
    skipped: list[Skipped] = []
    found: dict[str, None] = {}
    for state, kind, executor in _walk(rows):
        rev = str(state.get("rev") or "")
        label = _label(state, kind)
        data = state.get("data") if isinstance(state.get("data"), dict) else None
        files = (data or {}).get("metrics")
        if isinstance(files, dict):
            found.update(dict.fromkeys(str(f) for f in files))
        reason = _skip_reason(state, data, executor, metrics_path)
        if reason is not None or data is None:
            skipped.append(Skipped(label, reason or "no data"))
            continue
        metrics = data["metrics"][metrics_path]["data"]
        experiments.append(Experiment(label, rev, kind, _flat_params(data.get("params")), metrics))
    if metrics_path not in found:
        seen = ", ".join(found) if found else "none"
        raise UserError(
            f"no row of `{DVC_EXP_SHOW}` has the metrics file {metrics_path} (metrics files "
            f"found: {seen}); pick one with --metrics"
        )
    experiments, dup = _drop_duplicate_workspace(experiments)
    skipped = dup + skipped
    if not experiments:
        raise UserError(
            f"no row of `{DVC_EXP_SHOW}` has usable {metrics_path}: skipped "
            + "; ".join(f"{s.label}: {s.reason}" for s in skipped)
        )
    return ExpShow(tuple(experiments), tuple(skipped), metrics_path)


def with_full_metrics(exps: ExpShow, repo: Path) -> ExpShow:
    """``exps`` with each experiment's metrics read whole from the git repository ``repo``.

    ``dvc exp show --json`` keeps only numbers, so the confidence intervals the eval writes as
    ``[lo, hi]`` lists are missing from it. An experiment's (or commit's) metrics file is
    committed in its git ref (``git show <rev>:<metrics path>``), the workspace's is the file
    itself. A row whose file cannot be read so keeps what ``dvc exp show`` gave."""
    out = []
    for e in exps.experiments:
        text = None
        if e.kind == "workspace":
            path = Path(repo) / exps.metrics_path
            text = path.read_text(encoding="utf-8") if path.is_file() else None
        elif re.fullmatch(r"[0-9a-f]{7,40}", e.rev):
            done = subprocess.run(
                ["git", "-C", str(repo), "show", f"{e.rev}:{exps.metrics_path}"],
                capture_output=True,
                text=True,
                check=False,
            )
            text = done.stdout if done.returncode == 0 else None
        try:
            full = json.loads(text) if text else None
        except json.JSONDecodeError:
            full = None
        out.append(
            Experiment(e.label, e.rev, e.kind, e.params, full) if isinstance(full, dict) else e
        )
    return ExpShow(tuple(out), exps.skipped, exps.metrics_path)


def _walk(rows: Sequence[Any]) -> Iterator[tuple[dict[str, Any], str, Any]]:
    """(experiment state, kind, executor) of each commit row and each of its experiments."""
    for row in rows:
        kind = "workspace" if row.get("rev") == "workspace" else "baseline"
        yield row, kind, None
        for exp_range in row.get("experiments") or []:
            if not isinstance(exp_range, dict):
                continue
            revs = [r for r in exp_range.get("revs") or [] if isinstance(r, dict)]
            if not revs:
                continue
            state = revs[0]  # the experiment's tip (dvc 3 records one rev per experiment)
            name = state.get("name") or exp_range.get("name")
            yield {**state, "name": name}, "experiment", exp_range.get("executor")


def _label(state: Mapping[str, Any], kind: str) -> str:
    rev = str(state.get("rev") or "")
    if kind == "workspace":
        return "workspace"
    if kind == "baseline":
        return f"baseline ({rev[:7]})"
    return str(state.get("name") or rev[:7])


def _skip_reason(
    state: Mapping[str, Any], data: Mapping[str, Any] | None, executor: Any, metrics_path: str
) -> str | None:
    status = executor.get("state") if isinstance(executor, dict) else None
    if status in SKIP_STATES:
        return str(status)
    if state.get("error"):
        return f"error: {_error_text(state['error'])}"
    if data is None:
        return "no data"
    files = data.get("metrics")
    entry = files.get(metrics_path) if isinstance(files, dict) else None
    if not isinstance(entry, dict):
        return f"no {metrics_path}"
    if entry.get("error"):
        return f"no {metrics_path} ({_error_text(entry['error'])})"
    if not isinstance(entry.get("data"), dict) or not entry["data"]:
        return f"{metrics_path} is empty"
    return None


def _error_text(error: Any) -> str:
    if isinstance(error, dict):
        return str(error.get("type") or error.get("msg") or "error")
    return str(error)


def _flat_params(params: Any) -> dict[str, Any]:
    out: dict[str, Any] = {}
    if not isinstance(params, dict):
        return out
    for file, entry in params.items():
        data = entry.get("data") if isinstance(entry, dict) else None
        if isinstance(data, dict):
            _flatten(data, "" if file == PARAMS_FILE else f"{file}:", out)
    return out


def _flatten(tree: Mapping[str, Any], prefix: str, out: dict[str, Any]) -> None:
    for key, value in tree.items():
        if isinstance(value, dict) and value:
            _flatten(value, f"{prefix}{key}.", out)
        else:
            out[f"{prefix}{key}"] = value


def _drop_duplicate_workspace(
    experiments: list[Experiment],
) -> tuple[list[Experiment], list[Skipped]]:
    """Without the workspace when another row has its params and metrics (``dvc exp run``
    leaves the last experiment in the workspace)."""
    kept: list[Experiment] = []
    skipped: list[Skipped] = []
    for e in experiments:
        twin = next(
            (
                o
                for o in experiments
                if e.kind == "workspace"
                and o is not e
                and o.params == e.params
                and o.metrics == e.metrics
            ),
            None,
        )
        if twin is None:
            kept.append(e)
        else:
            skipped.append(Skipped(e.label, f"same params and metrics as {twin.label}"))
    return kept, skipped


# ----------------------------------------------------------------------------- report


@dataclass(frozen=True)
class Interval:
    """A mean and its CI; ``approx``: the normal approximation, not the eval's bootstrap."""

    mean: float
    lo: float | None = None
    hi: float | None = None
    approx: bool = False

    @property
    def has_ci(self) -> bool:
        return self.lo is not None and self.hi is not None


@dataclass(frozen=True)
class SeedSummary:
    """Mean and std over training seeds (``metrics["learned"]["seeds"][method]``); None: not recorded."""

    n_seeds: int | None
    nfe: tuple[float, float | None] | None
    quality: tuple[float, float | None] | None
    gain: tuple[float, float | None] | None


@dataclass(frozen=True)
class MethodResult:
    method: str
    nfe: Interval | None
    quality: Interval | None
    gain: Interval | None
    headline: bool
    """The experiment's headline method (``metrics["frontier"]["method"]``)."""
    seeds: SeedSummary | None


@dataclass(frozen=True)
class ReportRow:
    experiment: Experiment
    params: dict[str, Any]
    """The parameter columns' values (keys the experiment lacks are left out)."""
    results: tuple[MethodResult, ...]
    """The selected methods the experiment has, in the selection's order."""
    confidence: float


@dataclass(frozen=True)
class AblationReport:
    rows: tuple[ReportRow, ...]
    methods: tuple[str, ...]
    metric: str
    gain_metric: str | None
    """The metric the frontier gains are measured in (the metrics' ``frontier.metric``)."""
    param_keys: tuple[str, ...]
    params_differ: bool
    """True when the parameter columns are the defaults (the params that differ)."""
    skipped: tuple[Skipped, ...]
    metrics_path: str

    @property
    def confidences(self) -> tuple[float, ...]:
        return tuple(sorted({r.confidence for r in self.rows}))

    @property
    def has_seeds(self) -> bool:
        return any(m.seeds is not None for r in self.rows for m in r.results)


def method_entries(metrics: Mapping[str, Any]) -> dict[str, dict[str, Any]]:
    """The methods of an eval metrics file: entries with a ``kind`` and an ``nfe``."""
    return {
        str(name): entry
        for name, entry in metrics.items()
        if isinstance(entry, dict) and "kind" in entry and "nfe" in entry
    }


def default_methods(experiments: Sequence[Experiment]) -> list[str]:
    """Every method of kind ``policy`` (in first-seen order), then the headline methods
    (``frontier.method``) not among them."""
    methods: dict[str, None] = {}
    for e in experiments:
        for name, entry in method_entries(e.metrics).items():
            if entry.get("kind") == "policy":
                methods[name] = None
    for e in experiments:
        headline = _headline(e.metrics).get("method")
        if isinstance(headline, str) and headline in method_entries(e.metrics):
            methods[headline] = None
    return list(methods)


def differing_params(experiments: Sequence[Experiment]) -> list[str]:
    """The params whose values are not the same in every experiment (a key one of them lacks
    counts as differing), in first-seen order."""
    keys: dict[str, None] = {}
    for e in experiments:
        keys.update(dict.fromkeys(e.params))
    absent = object()
    return [
        k
        for k in keys
        if len(
            {json.dumps(e.params.get(k, absent), sort_keys=True, default=repr) for e in experiments}
        )
        > 1
    ]


def build_report(
    exps: ExpShow,
    methods: Sequence[str] | None = None,
    metric: str | None = None,
    params: Sequence[str] | None = None,
) -> AblationReport:
    """The table's content: per experiment, each of ``methods`` it has (default:
    :func:`default_methods`) with NFE, ``metric`` (default: the metrics' ``frontier.metric``, else
    ``clip_score``) and gain, all with CIs; ``params``: the parameter columns (default:
    :func:`differing_params`). :class:`UserError` for a method, metric or param no experiment
    has."""
    experiments = exps.experiments
    known: dict[str, None] = {}
    for e in experiments:
        known.update(dict.fromkeys(method_entries(e.metrics)))
    if methods is None:
        chosen = default_methods(experiments)
        if not chosen:
            raise UserError(
                f"no method of kind 'policy' in {exps.metrics_path}; name some with --methods "
                f"(methods: {_listing(known)})"
            )
    else:
        chosen = list(dict.fromkeys(methods))
        if not chosen:
            raise UserError(f"--methods names no method (methods: {_listing(known)})")
        unknown = [m for m in chosen if m not in known]
        if unknown:
            raise UserError(
                f"--methods: {', '.join(unknown)} not in any experiment's {exps.metrics_path} "
                f"(methods: {_listing(known)})"
            )
    gain_metrics = list(
        dict.fromkeys(
            str(_headline(e.metrics)["metric"])
            for e in experiments
            if isinstance(_headline(e.metrics).get("metric"), str)
        )
    )
    metric = metric or (gain_metrics[0] if gain_metrics else DEFAULT_METRIC)
    entries = [method_entries(e.metrics).get(m) for e in experiments for m in chosen]
    if not any(isinstance(x, dict) and _num(x.get(metric)) is not None for x in entries):
        scores: dict[str, None] = {}
        for x in entries:
            if isinstance(x, dict):
                scores.update(
                    dict.fromkeys(
                        k[: -len("_std")]
                        for k in x
                        if k.endswith("_std") and k != "nfe_std" and k[: -len("_std")] in x
                    )
                )
        raise UserError(
            f"--metric: no method has {metric!r} in {exps.metrics_path} (metrics: "
            f"{_listing(scores)})"
        )
    if params is None:
        keys, differ = differing_params(experiments), True
    else:
        keys, differ = list(dict.fromkeys(params)), False
        all_keys: dict[str, None] = {}
        for e in experiments:
            all_keys.update(dict.fromkeys(e.params))
        unknown = [k for k in keys if k not in all_keys]
        if unknown:
            hint = differing_params(experiments)
            raise UserError(
                f"--params: {', '.join(unknown)} not a param of any experiment (dotted keys such "
                f"as rewards.c_nfe; the params that differ: {_listing(dict.fromkeys(hint))})"
            )
    rows = tuple(_row(e, chosen, metric, keys) for e in experiments)
    return AblationReport(
        rows=rows,
        methods=tuple(chosen),
        metric=metric,
        gain_metric="/".join(gain_metrics) if gain_metrics else None,
        param_keys=tuple(keys),
        params_differ=differ,
        skipped=exps.skipped,
        metrics_path=exps.metrics_path,
    )


def _row(e: Experiment, methods: Sequence[str], metric: str, keys: Sequence[str]) -> ReportRow:
    confidence = _num(e.params.get("eval.confidence"))
    if confidence is None or not 0.0 < confidence < 1.0:
        confidence = DEFAULT_CONFIDENCE
    z = NormalDist().inv_cdf(0.5 + confidence / 2.0)
    entries = method_entries(e.metrics)
    headline = _headline(e.metrics)
    learned = e.metrics.get("learned") if isinstance(e.metrics.get("learned"), dict) else {}
    seeds = learned.get("seeds") if isinstance(learned.get("seeds"), dict) else {}
    results: list[MethodResult] = []
    for m in methods:
        entry = entries.get(m)
        if entry is None:
            continue
        results.append(
            MethodResult(
                method=m,
                nfe=interval(entry, "nfe", z),
                quality=interval(entry, metric, z),
                gain=gain_interval(entry, headline, m),
                headline=headline.get("method") == m,
                seeds=seed_summary(seeds.get(m), metric),
            )
        )
    params = {k: e.params[k] for k in keys if k in e.params}
    return ReportRow(e, params, tuple(results), confidence)


def _headline(metrics: Mapping[str, Any]) -> dict[str, Any]:
    h = metrics.get("frontier")
    return h if isinstance(h, dict) else {}


def _num(x: Any) -> float | None:
    """A finite number (JSON null stands for NaN in the metrics) or None."""
    if isinstance(x, bool) or not isinstance(x, (int, float)):
        return None
    return float(x) if math.isfinite(x) else None


def _pair(x: Any) -> tuple[float, float] | None:
    if isinstance(x, (list, tuple)) and len(x) == 2:
        lo, hi = _num(x[0]), _num(x[1])
        if lo is not None and hi is not None:
            return lo, hi
    return None


def interval(entry: Mapping[str, Any], key: str, z: float) -> Interval | None:
    """``entry[key]`` with its CI: ``entry["<key>_ci"]`` when there, else ``mean ± z·std/√n``
    from ``<key>_std`` and ``n`` (``approx``), else no CI; None without ``entry[key]``."""
    mean = _num(entry.get(key))
    if mean is None:
        return None
    ci = _pair(entry.get(f"{key}_ci"))
    if ci is not None:
        return Interval(mean, ci[0], ci[1])
    std, n = _num(entry.get(f"{key}_std")), _num(entry.get("n"))
    if std is not None and n is not None and n >= 1:
        half = z * std / math.sqrt(n)
        return Interval(mean, mean - half, mean + half, approx=True)
    return Interval(mean)


_LINE_CI = re.compile(r"\bci=\[\s*([-+0-9.eE]+|nan)\s*,\s*([-+0-9.eE]+|nan)\s*\]")


def gain_interval(
    entry: Mapping[str, Any], headline: Mapping[str, Any], method: str
) -> Interval | None:
    """The gain over the frontier (``entry["frontier"]["gain"]``) with its CI (``...["ci"]``;
    for the headline method also the headline's ``ci`` or the ``ci=[lo,hi]`` of its ``line``)."""
    f = entry.get("frontier")
    gain = _num(f.get("gain")) if isinstance(f, dict) else None
    if gain is None or not isinstance(f, dict):
        return None
    ci = _pair(f.get("ci"))
    if ci is None and headline.get("method") == method:
        ci = _pair(headline.get("ci"))
        match = _LINE_CI.search(str(headline.get("line") or "")) if ci is None else None
        if match is not None:
            ci = _pair([_float(match[1]), _float(match[2])])
    return Interval(gain, ci[0], ci[1]) if ci is not None else Interval(gain)


def _float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def seed_summary(entry: Any, metric: str) -> SeedSummary | None:
    """``metrics["learned"]["seeds"][method]`` (``n_seeds``, ``<m>_mean``, ``<m>_std`` for m in nfe,
    ``metric``, gain) or None."""
    if not isinstance(entry, dict):
        return None

    def mean_std(key: str) -> tuple[float, float | None] | None:
        mean = _num(entry.get(f"{key}_mean"))
        return None if mean is None else (mean, _num(entry.get(f"{key}_std")))

    n = _num(entry.get("n_seeds"))
    return SeedSummary(
        n_seeds=int(n) if n is not None else None,
        nfe=mean_std("nfe"),
        quality=mean_std(metric),
        gain=mean_std("gain"),
    )


def _listing(names: Mapping[str, Any], limit: int = 20) -> str:
    shown = list(names)[:limit]
    more = len(names) - len(shown)
    return (", ".join(shown) or "none") + (f", ... ({more} more)" if more > 0 else "")


# ----------------------------------------------------------------------------- markdown


def _percent(confidence: float) -> str:
    return f"{confidence * 100:g}%"


def _ci_name(report: AblationReport) -> str:
    levels = report.confidences
    return f"{_percent(levels[0])} CI" if len(levels) == 1 else "CI"


def format_interval(iv: Interval | None, fmt: str) -> str:
    """``5.18 [4.86, 5.51]`` (``†`` after a normal approximation); ``–`` for None."""
    if iv is None:
        return MISSING
    text = fmt.format(iv.mean)
    if iv.lo is not None and iv.hi is not None:
        text += f" [{fmt.format(iv.lo)}, {fmt.format(iv.hi)}]"
    return text + ("†" if iv.approx else "")


def _mean_std(x: tuple[float, float | None] | None, fmt: str) -> str:
    if x is None:
        return MISSING
    mean, std = x
    return fmt.format(mean) + ("" if std is None else f" ± {fmt.format(std).lstrip('+')}")


def format_seeds(s: SeedSummary | None) -> str:
    if s is None:
        return MISSING
    cells = [
        _mean_std(s.nfe, "{:.2f}"),
        _mean_std(s.quality, "{:.3f}"),
        _mean_std(s.gain, "{:+.3f}"),
    ]
    n = f" (n={s.n_seeds})" if s.n_seeds is not None else ""
    return " / ".join(cells) + n


def format_param(value: Any) -> str:
    """A param as YAML would write it: ``0.1``, ``true``, ``[1, 2]``, ``null``."""
    if isinstance(value, bool):
        return "true" if value else "false"
    if value is None:
        return "null"
    if isinstance(value, float):
        return f"{value:g}"
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(format_param(v) for v in value) + "]"
    if isinstance(value, dict):
        return json.dumps(value, sort_keys=True)
    return str(value)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")


def to_markdown(report: AblationReport) -> str:
    """The table (one row per experiment and method; the experiment's name and params on its
    first row) and its notes: what the columns are, how the CIs were made, what was skipped."""
    ci = _ci_name(report)
    gain_metric = report.gain_metric or report.metric
    header = [
        "experiment",
        *(f"`{k}`" for k in report.param_keys),
        "method",
        f"NFE [{ci}]",
        f"{report.metric} [{ci}]",
        f"gain vs frontier ({gain_metric}) [{ci}]",
    ]
    if report.has_seeds:
        header.append(f"over seeds: NFE / {report.metric} / gain (mean ± std)")
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for row in report.rows:
        first = [
            row.experiment.label,
            *(
                format_param(row.params[k]) if k in row.params else MISSING
                for k in report.param_keys
            ),
        ]
        blank = [""] * len(first)
        results = row.results or (None,)
        for i, r in enumerate(results):
            lead = first if i == 0 else blank
            if r is None:
                cells = [f"(none of {', '.join(report.methods)})", MISSING, MISSING, MISSING]
                cells += [MISSING] if report.has_seeds else []
            else:
                cells = [
                    f"**{r.method}**" if r.headline else r.method,
                    format_interval(r.nfe, "{:.2f}"),
                    format_interval(r.quality, "{:.3f}"),
                    format_interval(r.gain, "{:+.3f}"),
                ]
                if report.has_seeds:
                    cells.append(format_seeds(r.seeds))
            lines.append("| " + " | ".join(_cell(c) for c in [*lead, *cells]) + " |")
    return "\n".join(lines) + "\n\n" + "\n\n".join(notes(report)) + "\n"


def notes(report: AblationReport) -> list[str]:
    """The paragraphs under the table."""
    results = [r for row in report.rows for r in row.results]
    gain_metric = report.gain_metric or report.metric
    levels = " / ".join(_percent(c) for c in report.confidences)
    if report.param_keys:
        which = "that differ between the experiments" if report.params_differ else "asked for"
        params = f"; the parameter columns are the params {which}"
    else:
        params = ""
    out = [
        f"One row per experiment and method, from each experiment's `{report.metrics_path}` "
        f"(`{DVC_EXP_SHOW}`){params}. NFE: mean denoiser evaluations per held-out image; "
        f"{report.metric}: its mean score; gain: {gain_metric} minus the fixed-schedule frontier "
        "interpolated at the method's NFE (above 0: better than any fixed schedule of that "
        "cost). Bold: the experiment's headline method (`frontier.method`, its best learned "
        "policy)."
    ]
    ci = f"[CI]: {levels} prompt-cluster bootstrap intervals of the eval"
    approx = [r for r in results for iv in (r.nfe, r.quality) if iv is not None and iv.approx]
    if approx:
        ci += (
            f"; †: the metrics have no `<m>_ci`, so the interval is the normal approximation "
            f"mean ± z·std/√n over the n images (z for {levels}), which ignores that a prompt's "
            "seeds are correlated and is likely too narrow"
        )
    if any(iv is not None and not iv.has_ci for r in results for iv in (r.nfe, r.quality, r.gain)):
        ci += "; a number without [CI]: the metrics record none for it"
    out.append(ci + ".")
    if report.has_seeds:
        out.append(
            "Over seeds: mean ± std over n training seeds (the metrics' `seeds.<method>`); – where "
            "a method was not run over seeds."
        )
    if report.skipped:
        listed = "; ".join(f"{s.label}: {s.reason}" for s in report.skipped)
        out.append(f"Skipped {len(report.skipped)} row(s): {listed}.")
    return out


# ----------------------------------------------------------------------------- plot


def plot_report(report: AblationReport, path: Path) -> Path:
    """Quality vs NFE: one marker per (experiment, method) with CI error bars on both axes
    (none where there is no CI), a colour per method, labelled with the experiment; squares for
    the workspace and commits; the first experiment's fixed-schedule frontier (best mean score of
    a fixed schedule at or below each NFE, as ``addiffusion eval`` draws it) in grey."""
    import matplotlib

    matplotlib.use("Agg")  # files only; no display on servers and CI
    import matplotlib.pyplot as plt

    path = Path(path)
    colours = {m: f"C{i % 10}" for i, m in enumerate(report.methods)}
    fig, ax = plt.subplots(figsize=(7.5, 5.0))
    xs: list[float] = []
    ys: list[float] = []
    # Experiments with the same result for a method (BC ignores the reward, say) share one
    # marker, labelled with all their names.
    points: dict[
        tuple[str, float, float], tuple[MethodResult, Interval, Interval, list[ReportRow]]
    ] = {}
    for row in report.rows:
        for r in row.results:
            if r.nfe is not None and r.quality is not None:
                key = (r.method, r.nfe.mean, r.quality.mean)
                points.setdefault(key, (r, r.nfe, r.quality, []))[3].append(row)
    labelled: set[str] = set()
    for r, nfe, quality, rows in points.values():
        x, y = nfe.mean, quality.mean
        ax.errorbar(
            x,
            y,
            xerr=_err(nfe),
            yerr=_err(quality),
            fmt="o" if any(row.experiment.kind == "experiment" for row in rows) else "s",
            color=colours[r.method],
            markersize=8 if r.headline else 6,
            capsize=2,
            elinewidth=1,
            label=None if r.method in labelled else r.method,
        )
        labelled.add(r.method)
        ax.annotate(
            ", ".join(row.experiment.label for row in rows),
            (x, y),
            fontsize=7,
            xytext=(4, 4),
            textcoords="offset points",
            color=colours[r.method],
        )
        xs += [x, *(v for v in (nfe.lo, nfe.hi) if v is not None)]
        ys += [y, *(v for v in (quality.lo, quality.hi) if v is not None)]
    if xs:
        x_lo, x_hi = _padded(min(xs), max(xs))
        curve = _fixed_frontier(report.rows[0].experiment.metrics, report.metric)
        inside = [(k, s) for k, s in curve if x_lo <= k <= x_hi]
        if len(curve) >= 2:
            ax.plot(
                [k for k, _ in curve],
                [s for _, s in curve],
                "-",
                color="0.6",
                linewidth=1,
                zorder=0,
                label=f"fixed-schedule frontier ({report.rows[0].experiment.label})",
            )
            ys += [s for _, s in inside] + [_interp(curve, x_lo), _interp(curve, x_hi)]
        ax.set_xlim(x_lo, x_hi)
        ax.set_ylim(*_padded(min(ys), max(ys)))
    ci = _ci_name(report)
    ax.set_xlabel(f"mean NFE per held-out image [{ci}]")
    ax.set_ylabel(f"{report.metric.replace('_', ' ')} [{ci}]")
    ax.set_title(f"Ablations: held-out {report.metric.replace('_', ' ')} vs NFE", fontsize=10)
    ax.grid(alpha=0.3)
    if labelled:
        ax.legend(fontsize=7, loc="best")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _err(iv: Interval) -> list[list[float]] | None:
    if iv.lo is None or iv.hi is None:
        return None
    return [[max(iv.mean - iv.lo, 0.0)], [max(iv.hi - iv.mean, 0.0)]]


def _padded(lo: float, hi: float, frac: float = 0.08) -> tuple[float, float]:
    pad = (hi - lo) * frac or max(abs(lo) * frac, 0.05)
    return lo - pad, hi + pad


def _fixed_frontier(metrics: Mapping[str, Any], metric: str) -> list[tuple[float, float]]:
    """(NFE, best mean ``metric`` of a fixed schedule at or below it) for each NFE of the
    ``kind == "baseline"`` methods."""
    best: dict[float, float] = {}
    for entry in method_entries(metrics).values():
        k, s = _num(entry.get("nfe")), _num(entry.get(metric))
        if entry.get("kind") == "baseline" and k is not None and s is not None:
            best[k] = max(best.get(k, -math.inf), s)
    curve: list[tuple[float, float]] = []
    running = -math.inf
    for k in sorted(best):
        running = max(running, best[k])
        curve.append((k, running))
    return curve


def _interp(curve: Sequence[tuple[float, float]], x: float) -> float:
    if x <= curve[0][0]:
        return curve[0][1]
    for (k0, s0), (k1, s1) in zip(curve, curve[1:], strict=False):
        if k0 <= x <= k1:
            return s0 + (s1 - s0) * (x - k0) / (k1 - k0)
    return curve[-1][1]
