"""``addiffusion <command> ...``: one console script, one subcommand per stage (and a few helpers).

Each stage module ``addiffusion.<stage>.cli`` exposes ``register(subparsers)``, which adds its
subcommand(s) and sets ``func`` on the parsed namespace. :func:`build_parser` gives every parser
one :class:`HelpFormatter`, so help texts read alike whoever wrote them.

A :class:`~addiffusion.config.UserError` (a bad params key, input file or row) or a missing input
file ends the command with exit status 2 and one line on stderr naming what is wrong; ``--debug``
shows the traceback.
"""

from __future__ import annotations

import argparse
import copy
import importlib
import inspect
import re
import sys
import textwrap
from collections.abc import Iterator

from addiffusion.config import UserError

STAGES = (
    "backbone",
    "worlds.shapes",
    "collect",
    "datasets",
    "offline_rl",
    "online_finetune",
    "eval",
    "policy",
    "bench",
    "distill",
    "report",
)
"""Modules under ``addiffusion`` whose ``cli.register`` adds subcommands (``offline_rl`` is spelt
``offline-rl`` on the command line, ``online_finetune`` ``online-finetune``)."""

PIPELINE = (
    "shapes train",
    "shapes ship",
    "bench shapes",
    "collect",
    "datasets build",
    "datasets relabel",
    "datasets stats",
    "offline-rl train",
    "online-finetune",
    "eval baselines",
    "eval",
    "policy export",
    "bench policy",
    "distill train",
    "distill eval",
)
"""The commands of dvc.yaml's stages, in its order (tests/test_cli_help.py checks it); every
other command is a helper."""


class HelpFormatter(argparse.HelpFormatter):
    """Help that reads alike across commands.

    Descriptions (often a module's docstring) are shown as plain text (see :func:`plain_text`),
    and their paragraphs, bullet lists and indented blocks keep their shape instead of being run
    together. Every option with a default says it, "(default: ...)", unless its help already
    talks about its default.
    """

    def _fill_text(self, text: str, width: int, indent: str) -> str:
        text = plain_text(text)
        # A module docstring opens with "``addiffusion bench collect``: what ..."; usage says it.
        text = re.sub(r"^`addiffusion [^`]+`: (\w)", lambda m: m[1].upper(), text)
        paragraphs = re.split(r"\n\s*\n", text)
        return "\n\n".join(_fill_paragraph(p, width, indent) for p in paragraphs if p.strip())

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if not _shows_default(action) or "default" in text:
            return text
        return f"{text} (default: %(default)s)".lstrip()

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and _shows_default(action):
            # argparse prints nothing after an option without help, not even its default.
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


def plain_text(text: str) -> str:
    """A docstring's reST as plain text for a terminal: inline literals (double backticks) and
    roles such as :func: become single-backtick words, emphasis loses its stars, and the double
    colon that opens a literal block becomes one colon."""
    text = inspect.cleandoc(text)
    text = re.sub(r":[a-z]+:`~?([^`]+)`", r"`\1`", text)
    text = re.sub(r"``(.+?)``", r"`\1`", text, flags=re.DOTALL)
    text = re.sub(r"(?<![\w*])\*([^\s*](?:[^*\n]*[^\s*])?)\*(?![\w*])", r"\1", text)  # *emphasis*
    return re.sub(r"\s*::[ \t]*$", ":", text, flags=re.MULTILINE)


def _fill_paragraph(paragraph: str, width: int, indent: str) -> str:
    lines = paragraph.strip("\n").splitlines()
    if lines[0].startswith((" ", "\t")):  # a literal block: as written
        return "\n".join(indent + line for line in lines)
    if lines[0].startswith(("* ", "- ")):  # a bullet list: one filled item per bullet
        items: list[str] = []
        for line in lines:
            if line.startswith(("* ", "- ")):
                items.append(line[2:])
            else:
                items[-1] += " " + line.strip()
        return "\n".join(
            textwrap.fill(
                " ".join(item.split()),
                width,
                initial_indent=indent + "* ",
                subsequent_indent=indent + "  ",
            )
            for item in items
        )
    return textwrap.fill(
        " ".join(paragraph.split()), width, initial_indent=indent, subsequent_indent=indent
    )


def _shows_default(action: argparse.Action) -> bool:
    """Whether the help should name ``action``'s default: an optional value that is set (None
    means "not given" and store_true's False says nothing)."""
    if not action.option_strings or action.required:
        return False
    default = action.default
    return default is not None and default is not False and default != argparse.SUPPRESS


def walk(
    parser: argparse.ArgumentParser, path: tuple[str, ...] = ()
) -> Iterator[tuple[tuple[str, ...], argparse.ArgumentParser]]:
    """``parser`` and every subcommand parser under it, each with its command path
    (``()``, ``("datasets",)``, ``("datasets", "build")``, ...)."""
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from walk(sub, (*path, name))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="addiffusion")
    parser.add_argument(
        "--debug",
        action="store_true",
        help="on an error in your input (params, files), show the traceback too",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="<command>")
    for stage in STAGES:
        try:
            module = importlib.import_module(f"addiffusion.{stage}.cli")
        except ModuleNotFoundError as e:
            if e.name != f"addiffusion.{stage}.cli" and e.name != f"addiffusion.{stage}":
                raise
            continue
        module.register(sub)
    leaves = [" ".join(path) for path, p in walk(parser) if path and not _has_subcommands(p)]
    helpers = [c for c in leaves if c not in PIPELINE]
    parser.description = (
        "Adaptive text-to-image diffusion inference, learned offline-first: a policy decides at "
        "each step whether the sampler jumps ahead, stops or refines.\n\n"
        "The pipeline: dvc.yaml's stages run these commands, in this order (`dvc repro` runs "
        f"what changed): {', '.join(PIPELINE)}. They read their settings from params.yaml, one "
        "section per stage.\n\n"
        f"Helpers, not pipeline stages: {', '.join(helpers)}.\n\n"
        "`addiffusion <command> --help` says what a command reads and writes."
    )
    for _, p in walk(parser):
        p.formatter_class = HelpFormatter
    return parser


def _has_subcommands(parser: argparse.ArgumentParser) -> bool:
    return any(isinstance(a, argparse._SubParsersAction) for a in parser._actions)


def main(argv: list[str] | None = None) -> int:
    return run(build_parser().parse_args(argv))


def run(args: argparse.Namespace) -> int:
    """Run a parsed command: a user error (a params key, a file, a row; an input file that is
    not there) is the user's to fix, so say what is wrong in one line, no traceback, exit 2."""
    try:
        result = args.func(args)
    except (UserError, FileNotFoundError) as e:
        if getattr(args, "debug", False):
            raise
        print(f"addiffusion: error: {one_line(str(e))}", file=sys.stderr)
        return 2
    return int(result or 0)


def one_line(message: str) -> str:
    """``message`` on one line: a listing ("3 problem(s):" then one per line) joined by "; "."""
    lines = [line.strip() for line in message.splitlines() if line.strip()]
    out = lines[0] if lines else ""
    for line in lines[1:]:
        out += (" " if out.endswith(":") else "; ") + line
    return out


if __name__ == "__main__":
    sys.exit(main())
