"""The README's commands against the CLI: every flag it shows exists.

"The README is the front door. Keep it true." Every ``hwprune SUBCOMMAND ...`` in README.md (code blocks,
and inline code spans, which may wrap over lines) is parsed, and each ``--flag`` after the subcommand
must be an option of that subcommand's parser; a backticked flag on its own (``--distill-mixup A`` in a
bullet) must be an option of some subcommand, unless it belongs to another tool the README shows.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from hwprune.cli.main import build_parser

README = Path(__file__).resolve().parent.parent / "README.md"
# flags of other tools that the README shows in their own commands (pip, torchrun, TVM's RPC server, benchmarks)
OTHER_TOOLS = {"--no-deps", "--standalone", "--nproc_per_node", "--nnodes", "--rdzv-endpoint", "--port", "--quick",
               "--default", "--host", "--summarize"}
COMMAND = re.compile(r"\bhwprune\s+(fit|export|profile|targets|env)\b(.*)")
FLAG = re.compile(r"(?<![\w-])(--[a-z][a-z0-9_-]*)")


def _options() -> dict[str, set[str]]:
    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    return {name: set(p._option_string_actions) for name, p in sub.choices.items()}


def _commands(text: str) -> list[tuple[str, str]]:
    """(subcommand, the rest) of every hwprune command in code blocks (comments cut) and inline spans."""
    found, outside = [], []
    for i, part in enumerate(re.split(r"^```.*$", text, flags=re.M)):
        if i % 2:  # inside a fenced block: one command per line
            for line in part.splitlines():
                m = COMMAND.search(line.split("  #")[0])
                if m:
                    found.append((m.group(1), m.group(2)))
        else:
            outside.append(part)
    for span in re.findall(r"`([^`]+)`", "\n".join(outside)):
        m = COMMAND.search(" ".join(span.split()))
        if m:
            found.append((m.group(1), m.group(2)))
    return found


def _standalone_flags(text: str) -> set[str]:
    prose = "\n".join(p for i, p in enumerate(re.split(r"^```.*$", text, flags=re.M)) if i % 2 == 0)
    return {m.group(1) for span in re.findall(r"`([^`]+)`", prose) if span.lstrip().startswith("--")
            and not COMMAND.search(span) for m in [FLAG.match(span.lstrip())] if m}


def test_the_parser_in_this_test_sees_the_readme():
    commands = _commands(README.read_text())
    assert len(commands) > 30 and {c for c, _ in commands} >= {"fit", "export", "profile", "targets", "env"}


def test_every_flag_of_a_readme_command_exists_in_its_subcommand():
    options = _options()
    wrong = sorted({f"hwprune {cmd} {flag}" for cmd, rest in _commands(README.read_text())
                    for flag in FLAG.findall(rest) if flag not in options[cmd]})
    assert not wrong, f"README.md shows flags the CLI does not have: {wrong}"


def test_every_flag_named_in_the_readme_exists():
    options = set().union(*_options().values())
    unknown = sorted(_standalone_flags(README.read_text()) - options - OTHER_TOOLS)
    assert not unknown, f"README.md names flags no hwprune subcommand has: {unknown}"


@pytest.mark.parametrize("text, expect", [
    ("```\nhwprune fit --target x --no-such-flag 1   # --comment-flag\n```\n", ["hwprune fit --no-such-flag"]),
    ("Run `hwprune export RUN\n--format tvm --mesure` to time it.\n", ["hwprune export --mesure"]),
])
def test_the_check_fails_on_a_wrong_flag(text, expect):
    options = _options()
    wrong = sorted({f"hwprune {cmd} {flag}" for cmd, rest in _commands(text)
                    for flag in FLAG.findall(rest) if flag not in options[cmd]})
    assert wrong == expect
