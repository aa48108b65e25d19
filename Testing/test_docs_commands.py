"""Every `textsegment ...` command in the docs' code blocks parses with today's CLI.

Why: options get renamed and added; a README or recipe command that no longer parses is the first
thing a newcomer copies. Only code blocks are read (prose mentions are fragments); a synopsis line
is expanded first: ``[--x]`` → ``--x``, ``a|b`` → ``a``, ``list | import FILE`` → one command each.
"""

from __future__ import annotations

import contextlib
import io
import re
import shlex
from pathlib import Path

import pytest

from TextSegmentLib.cli import build_parser

REPO = Path(__file__).resolve().parents[1]
DOCS = [REPO / "README.md", REPO / "recipes" / "README.md", *sorted((REPO / "docs").rglob("*.md"))]


def code_blocks(text: str) -> list[str]:
    fenced = re.findall(r"```[a-z]*\n(.*?)```", text, flags=re.S)
    rest = re.sub(r"```.*?```", "", text, flags=re.S)
    return fenced + re.findall(r"((?:^    \S.*\n)+)", rest, flags=re.M)


def expand(command: str) -> list[str]:
    """A synopsis as the concrete commands it stands for (first choice of every alternative)."""
    command = re.sub(r"\s+#.*$", "", command).strip()
    command = re.sub(r"\[([^\]]*)\]", lambda m: m.group(1).split(" | ")[0], command)
    command = re.sub(r"(?<![\w/.-])([\w.-]+)(?:\|[\w.-]+)+", r"\1", command)
    first, *others = command.split(" | ")
    return [first] + [f"{first.split()[0]} {other}" for other in others]


def doc_commands() -> list[tuple[str, str]]:
    found = []
    for path in DOCS:
        for block in code_blocks(path.read_text(encoding="utf-8")):
            for line in block.replace("\\\n", " ").splitlines():
                match = re.search(r"(?:^|\s|/)textsegment (\S.*)$", line.strip())
                if match and not line.strip().startswith("#") and "python -c" not in line:
                    found += [(str(path.relative_to(REPO)), c) for c in expand(match.group(1))]
    return found


COMMANDS = doc_commands()


def test_the_docs_hold_the_commands_this_test_reads():
    assert len(COMMANDS) >= 25  # else the extraction broke and every command below passes vacuously
    assert any(c.startswith("reproduce ") for _, c in COMMANDS) and any(c.startswith("demo") for _, c in COMMANDS)


def test_synopses_expand_to_concrete_commands():
    assert expand("weights list | import FILE | verify") == ["weights list", "weights import FILE", "weights verify"]
    assert expand("segment CT -p x [--saliency] --grid compact|source  # note") == ["segment CT -p x --saliency --grid compact"]


@pytest.mark.parametrize(("doc", "command"), COMMANDS, ids=[f"{d}:{c[:60]}" for d, c in COMMANDS])
def test_documented_command_parses(doc, command):
    parser = build_parser()
    errors = io.StringIO()
    with contextlib.redirect_stderr(errors), contextlib.redirect_stdout(io.StringIO()):
        try:
            parser.parse_args(shlex.split(command))
        except SystemExit as exc:
            if exc.code:  # --help exits 0
                pytest.fail(f"{doc}: `textsegment {command}` does not parse: {errors.getvalue().strip().splitlines()[-1]}")
