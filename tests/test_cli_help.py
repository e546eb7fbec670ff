"""Every ``addiffusion ... --help`` answers a newcomer: a description, plain text (no reST), the
default of every option that has one, and a top-level help that says which commands dvc.yaml runs.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest
import yaml

from addiffusion.cli import PIPELINE, HelpFormatter, build_parser, plain_text, walk

REPO = Path(__file__).resolve().parents[1]
COMMANDS = [path for path, _ in walk(build_parser())]
REST = re.compile(r"``|:(func|class|meth|mod|attr|data|obj|exc):`")


def _parser(path: tuple[str, ...]) -> argparse.ArgumentParser:
    return dict(walk(build_parser()))[path]


def _help(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> str:
    with pytest.raises(SystemExit) as exit_:
        build_parser().parse_args([*path, "--help"])
    assert exit_.value.code == 0
    return capsys.readouterr().out


def _name(path: tuple[str, ...]) -> str:
    return " ".join(("addiffusion", *path))


@pytest.mark.parametrize("path", COMMANDS, ids=_name)
def test_help_is_plain_text(path: tuple[str, ...], capsys: pytest.CaptureFixture[str]) -> None:
    out = _help(path, capsys)
    assert out.startswith(f"usage: {_name(path)}")
    assert not REST.search(out), f"`{_name(path)} --help` shows reST markup:\n{out}"
    assert _parser(path).formatter_class is HelpFormatter


@pytest.mark.parametrize(
    "path",
    COMMANDS,
    ids=_name,
)
def test_help_has_a_description(path: tuple[str, ...]) -> None:
    description = _parser(path).description
    assert description and description.strip(), f"`{_name(path)} --help` has no description"


@pytest.mark.parametrize("path", COMMANDS, ids=_name)
def test_help_shows_defaults(path: tuple[str, ...]) -> None:
    parser = _parser(path)
    for action in parser._actions:
        default = action.default
        if not action.option_strings or action.required or default is None or default is False:
            continue
        if default == argparse.SUPPRESS:
            continue
        # The text argparse prints for this option; squeezed, as wrapping may split a value.
        text = "".join(parser._get_formatter()._format_action(action).split())
        assert "default" in text and "".join(str(default).split()) in text, (
            f"`{_name(path)} --help`: {'/'.join(action.option_strings)} does not show its "
            f"default {default!r}: {text}"
        )


def _dvc_commands() -> list[str]:
    """The addiffusion command of each dvc.yaml stage's cmd, in order ("datasets build")."""
    parser = build_parser()
    commands = []
    for stage in yaml.safe_load((REPO / "dvc.yaml").read_text())["stages"].values():
        for part in str(stage["cmd"]).split("&&"):
            words = part.split()
            assert words[0] == "addiffusion", f"dvc.yaml cmd {part!r} is not an addiffusion command"
            path: list[str] = []
            node = parser
            for word in words[1:]:
                subs = [a for a in node._actions if isinstance(a, argparse._SubParsersAction)]
                if not subs or word not in subs[0].choices:
                    break
                path.append(word)
                node = subs[0].choices[word]
            commands.append(" ".join(path))
    return commands


def test_top_level_help_names_the_pipeline_and_the_helpers(
    capsys: pytest.CaptureFixture[str],
) -> None:
    assert list(PIPELINE) == list(dict.fromkeys(_dvc_commands()))  # each command once
    out = " ".join(_help((), capsys).split())
    assert ", ".join(PIPELINE) in out
    helpers = out.split("Helpers, not pipeline stages: ")[1].split(".")[0].split(", ")
    assert "backbone build-tiny" in helpers and "generate" in helpers
    groups = {p[:-1] for p in COMMANDS if p}
    leaves = {" ".join(p) for p in COMMANDS if p and p not in groups}
    assert sorted(helpers) == sorted(leaves - set(PIPELINE))


def test_plain_text_drops_rest_and_keeps_blocks() -> None:
    doc = """``addiffusion x``: what it costs, see :func:`addiffusion.datasets.relabel.relabel`.

    * plain: the stock ``pipe(...)``, and
      a *second* line
    * collect: ends with::

        ratio=<x>
    """
    assert plain_text(doc) == (
        "`addiffusion x`: what it costs, see `addiffusion.datasets.relabel.relabel`.\n\n"
        "* plain: the stock `pipe(...)`, and\n  a second line\n* collect: ends with:\n\n"
        "    ratio=<x>"
    )
    parser = argparse.ArgumentParser(prog="x", description=doc, formatter_class=HelpFormatter)
    parser.add_argument("--n", type=int, default=3, help="count")
    parser.add_argument("--device", default="auto")
    parser.add_argument("--out", default=None, help="file")
    parser.add_argument("--quiet", action="store_true", help="no bar")
    out = parser.format_help()
    assert "What it costs" in out and "\n* plain: the stock `pipe(...)`, and a second line\n" in out
    assert "\n    ratio=<x>\n" in out
    assert "count (default: 3)" in out and "(default: auto)" in out
    assert "file\n" in out and "no bar\n" in out
