"""Every ``spiffe-delegate`` command in the README and docs/ names a subcommand and flags that
exist: a renamed flag fails here before it fails a reader."""

from __future__ import annotations

import argparse
import re
import shlex
from pathlib import Path

import pytest

from agent.cli import build_parser

ROOT = Path(__file__).resolve().parents[2]
DOCUMENTS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
             *sorted((ROOT / "deploy").rglob("*.md"))]
FENCE = re.compile(r"^```(\w*)\n(.*?)^```", re.MULTILINE | re.DOTALL)


def _subparsers() -> dict[str, argparse.ArgumentParser]:
    parser = build_parser()
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    raise AssertionError("no subcommands")


def commands_in(text: str) -> list[tuple[int, list[str]]]:
    """(line number, argv after 'spiffe-delegate') of every command in shell code blocks,
    with backslash continuations joined and comments dropped."""
    found: list[tuple[int, list[str]]] = []
    for block in FENCE.finditer(text):
        if block.group(1) not in ("", "sh", "bash", "console", "shell"):
            continue
        first_line = text[:block.start(2)].count("\n") + 1
        logical: list[tuple[int, str]] = []  # continuation lines joined, first line's number
        pending: tuple[int, str] | None = None
        for offset, raw in enumerate(block.group(2).splitlines()):
            start, head = pending if pending is not None else (first_line + offset, "")
            if raw.endswith("\\"):
                pending = (start, head + raw[:-1] + " ")
                continue
            pending = None
            logical.append((start, head + raw))
        for number, line in logical:
            line = line.strip().removeprefix("$ ")
            if "spiffe-delegate " not in line or line.startswith("#"):
                continue
            try:
                words = shlex.split(line, comments=True)
            except ValueError:
                continue
            for index, word in enumerate(words):
                previous = words[index - 1] if index else ""
                if previous.startswith("-") and previous != "--":
                    continue  # an option's value, e.g. kubectl -n spiffe-delegate
                if word == "spiffe-delegate" or word.endswith("/bin/spiffe-delegate"):
                    found.append((number, words[index + 1:]))
                    break
    return found


def _flags(parser: argparse.ArgumentParser) -> set[str]:
    return {flag for action in parser._actions for flag in action.option_strings}


def problems_in(text: str) -> list[str]:
    subcommands = _subparsers()
    problems = []
    for line, argv in commands_in(text):
        if not argv or argv[0] in ("--help", "-h"):
            continue
        name = argv[0]
        if name not in subcommands:
            problems.append(f"line {line}: no subcommand {name!r}")
            continue
        known = _flags(subcommands[name])
        for word in argv[1:]:
            if word in ("|", "&&", ";", ">", "2>&1"):
                break
            flag = word.split("=", 1)[0]
            if flag.startswith("--") and flag not in known:
                problems.append(f"line {line}: spiffe-delegate {name} has no {flag}")
    return problems


@pytest.mark.parametrize("document", DOCUMENTS, ids=lambda p: str(p.relative_to(ROOT)))
def test_documented_commands_exist(document: Path) -> None:
    problems = problems_in(document.read_text())
    assert problems == [], "\n".join(problems)


def test_the_scanner_finds_commands_and_can_fail() -> None:
    text = ("```sh\nspiffe-delegate run --sds-socket /x \\\n  --no-such-flag 1\n```\n"
            "```\n$ spiffe-delegate demo --duration 30s  # comment\n"
            "kubectl exec ds/spiffe-delegate -- ls /run/spiffe-delegate\n"
            "kubectl -n spiffe-delegate exec x -- spiffe-delegate status --json\n```\n")
    assert commands_in(text) == [(2, ["run", "--sds-socket", "/x", "--no-such-flag", "1"]),
                                 (6, ["demo", "--duration", "30s"]),
                                 (8, ["status", "--json"])]
    assert problems_in(text) == ["line 2: spiffe-delegate run has no --no-such-flag"]
    assert problems_in("```sh\nspiffe-delegate frobnicate\n```\n") == [
        "line 2: no subcommand 'frobnicate'"]
