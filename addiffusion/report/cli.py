"""``addiffusion report ...``: reports built from the pipeline's outputs (helpers, not stages)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from addiffusion.report.ablations import (
    DEFAULT_METRIC,
    DVC_EXP_SHOW,
    METRICS_PATH,
    build_report,
    parse_exp_show,
    plot_report,
    read_exp_show,
    to_markdown,
    with_full_metrics,
)

RECIPE = (
    f"{DVC_EXP_SHOW} > exps.json && addiffusion report ablations --input exps.json "
    "--out-md results/ablations.md --out-png results/ablations.png"
)

ABLATIONS_DESCRIPTION = f"""\
Turn `{DVC_EXP_SHOW}` (dvc 3.x) into a markdown table and a plot of each experiment's held-out \
NFE and quality, with confidence intervals, for the README.

Recipe:

    {RECIPE}

Rows: the workspace (left out when it is a copy of an experiment, as after `dvc exp run`), each \
commit, labelled "baseline (<sha7>)", then its experiments by name, in the JSON's order; rows \
without the metrics file (queued, running or failed experiments, commits without results) are \
listed under the table as skipped. Per experiment and method: mean NFE, the quality metric and \
the gain over the fixed-schedule frontier at the method's NFE, each with its CI from the eval \
(`<m>_ci`, a prompt-cluster bootstrap; without it, the normal approximation \
mean ± z·std/√n, marked †), and, when the metrics have `seeds.<method>`, mean ± std over \
training seeds. The columns before the methods are the params that differ between the \
experiments.

The plot: quality vs NFE, one marker per experiment and method with CI error bars on both \
axes, a colour per method, labelled with the experiment, over the first experiment's \
fixed-schedule frontier.

Without --input, runs `{DVC_EXP_SHOW}` in the current folder (the current commit's \
experiments; save `{DVC_EXP_SHOW} -A` to a file for every commit's)."""


def _split(text: str | None) -> list[str] | None:
    if text is None:
        return None
    return [w.strip() for w in text.split(",") if w.strip()]


def _ablations(args: argparse.Namespace) -> int:
    rows = read_exp_show(args.input)
    exps = parse_exp_show(rows, args.metrics)
    repo = args.repo if args.repo is not None else ("." if args.input is None else None)
    if repo is not None:
        exps = with_full_metrics(exps, Path(repo))
    report = build_report(
        exps, methods=_split(args.methods), metric=args.metric, params=_split(args.params)
    )
    markdown = to_markdown(report)
    # The table on stdout when no file is named, so that it pipes; then notes go to stderr.
    log = sys.stdout if args.out_md else sys.stderr
    if args.out_md:
        out = Path(args.out_md)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(markdown, encoding="utf-8")
    else:
        sys.stdout.write(markdown)
    if args.out_png:
        plot_report(report, Path(args.out_png))
    n_results = sum(len(r.results) for r in report.rows)
    skipped = f", skipped {len(report.skipped)} row(s)" if report.skipped else ""
    wrote = [p for p in (args.out_md, args.out_png) if p]
    print(
        f"report ablations: {len(report.rows)} experiment(s), {n_results} (experiment, method) "
        f"result(s), methods {', '.join(report.methods)}, metric {report.metric}{skipped}"
        + (f"; wrote {', '.join(wrote)}" if wrote else ""),
        file=log,
    )
    return 0


def register(sub: argparse._SubParsersAction) -> None:
    parser = sub.add_parser(
        "report",
        help="reports built from the pipeline's outputs (ablation tables and plots)",
        description="Reports built from the pipeline's outputs, for the README. `ablations`: "
        f"`{DVC_EXP_SHOW}` as a markdown table and a plot of held-out NFE and quality per "
        "experiment, with confidence intervals.",
    )
    report_sub = parser.add_subparsers(dest="report", required=True, metavar="<report>")
    p = report_sub.add_parser(
        "ablations",
        help=f"`{DVC_EXP_SHOW}` as a markdown table and a plot, with confidence intervals",
        description=ABLATIONS_DESCRIPTION,
    )
    p.add_argument(
        "--input",
        default=None,
        metavar="FILE",
        help=f"a saved `{DVC_EXP_SHOW}`, or - for stdin (default: run `{DVC_EXP_SHOW}` in the "
        "current folder)",
    )
    p.add_argument(
        "--repo",
        default=None,
        metavar="DIR",
        help="the git repository of the experiments: each one's metrics file is read whole "
        "from its git ref there (`dvc exp show` drops the list-valued confidence intervals) "
        "(default: the current folder without --input, else none)",
    )
    p.add_argument(
        "--metrics",
        default=METRICS_PATH,
        metavar="PATH",
        help="the metrics file of each experiment to report, as dvc names it",
    )
    p.add_argument(
        "--methods",
        default=None,
        metavar="A,B,...",
        help="comma-separated methods of the metrics file, e.g. iql,ppo (default: every method "
        "of kind policy, plus the headline method, frontier.method)",
    )
    p.add_argument(
        "--metric",
        default=None,
        help="the quality metric, e.g. verifier, clip_score or quality (default: the metrics' "
        f"frontier.metric, else {DEFAULT_METRIC})",
    )
    p.add_argument(
        "--params",
        default=None,
        metavar="KEY,...",
        help="comma-separated params to show as columns, dotted, e.g. rewards.c_nfe,"
        "offline_rl.beta (default: the params that differ between the experiments)",
    )
    p.add_argument(
        "--out-md",
        default=None,
        metavar="FILE",
        help="write the markdown table here (default: print it on stdout)",
    )
    p.add_argument(
        "--out-png",
        default=None,
        metavar="FILE",
        help="write the plot here, a PNG (default: no plot)",
    )
    p.set_defaults(func=_ablations)
