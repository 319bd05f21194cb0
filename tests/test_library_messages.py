"""Library errors speak in library terms: no message raised outside ``pvtune.cli`` names a
command-line flag (the CLI adds its flags to the messages it prints)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

PACKAGE = Path(__file__).resolve().parent.parent / "src" / "pvtune"
FLAG = re.compile(r"(?<![\w-])--[a-z][a-z-]+")
OTHER_TOOLS = {"--rdzv-endpoint"}  # torchrun's, which the library may name


def flags_in_raised_messages(source: str) -> list[str]:
    """Flags named in string literals inside ``raise`` statements and logging calls."""
    found = []
    for node in ast.walk(ast.parse(source)):
        call = node.exc if isinstance(node, ast.Raise) else node
        if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) \
                and node.func.attr in ("warning", "error", "info"):
            call = node
        elif not isinstance(node, ast.Raise):
            continue
        for part in ast.walk(call) if call is not None else ():
            if isinstance(part, ast.Constant) and isinstance(part.value, str):
                found += [f for f in FLAG.findall(part.value) if f not in OTHER_TOOLS]
    return found


def test_no_library_message_names_a_command_line_flag():
    offenders = {}
    for path in PACKAGE.rglob("*.py"):
        if path.name == "cli.py":
            continue
        flags = flags_in_raised_messages(path.read_text())
        if flags:
            offenders[str(path.relative_to(PACKAGE))] = flags
    assert offenders == {}


def test_the_check_sees_a_flag():
    assert flags_in_raised_messages('raise ValueError(f"use --lr {x}")') == ["--lr"]
    assert flags_in_raised_messages('log.warning("try --code-lr")') == ["--code-lr"]
    assert flags_in_raised_messages('x = "--lr"') == []
