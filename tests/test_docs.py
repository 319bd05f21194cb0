"""Every figure the README and docs/ quote comes from the results file it cites.

A paragraph, list item or table that names a results file (``benchmarks/results/NAME.md``,
``results/NAME.json`` or plain ``NAME.md`` for a file under ``benchmarks/results/``) may
quote only figures that the file holds: each decimal number in it (``27.33``, ``2.055x``,
``1.752e+05x``) must appear in that file's markdown or JSON, literally or as the value the
quoted digits round. Code (in backticks or fenced blocks) and version numbers are not
figures. A table takes the citation of the paragraph just before it.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
CITATION = re.compile(r"(?:benchmarks/)?(?:results/)?([A-Za-z0-9_.-]+?)\.(?:md|json|png)\b")
NUMBER = re.compile(r"(?<![\w.])(\d+\.\d+(?:e[+-]?\d+)?)(?![\w.]*\.\d)")
VERSION = re.compile(r"\d+\.\d+\.\d+")
FENCE = re.compile(r"^```.*?^```", re.MULTILINE | re.DOTALL)


def _units(text: str) -> list[tuple[int, str]]:
    """``(first line number, text)`` of each paragraph, list item and table; a table is
    joined to the paragraph before it."""
    text = FENCE.sub(lambda m: "\n" * m.group(0).count("\n"), text)
    units: list[tuple[int, list[str]]] = []
    for i, line in enumerate(text.splitlines(), 1):
        stripped = line.strip()
        new_item = re.match(r"^\s*([*-]|\d+\.)\s", line) is not None
        is_table = stripped.startswith("|")
        if not stripped or stripped.startswith("#"):
            units.append((i, []))
            continue
        last = units[-1] if units else None
        joins_table = is_table and last is not None and (
            last[1] or (len(units) > 1 and units[-2][1]))
        if joins_table and not last[1]:
            units.pop()  # the blank line between a paragraph and its table
            last = units[-1]
        if last is None or not last[1] or (new_item and not is_table):
            units.append((i, [line]))
        else:
            last[1].append(line)
    return [(i, "\n".join(lines)) for i, lines in units if lines]


def _results_numbers(stem: str) -> tuple[str, list[float]]:
    text = "".join(p.read_text() for p in (RESULTS / f"{stem}.md", RESULTS / f"{stem}.json")
                   if p.is_file())
    values = [float(m) for m in re.findall(r"-?\d+(?:\.\d+)?(?:e[+-]?\d+)?", text)]
    return text, values


def _matches(figure: str, text: str, values: list[float]) -> bool:
    if figure in text:
        return True
    value = float(figure)
    if "e" in figure:
        return any(abs(v - value) <= 5e-4 * abs(value) for v in values)
    decimals = len(figure.split(".")[1])
    return any(abs(v - value) <= 0.5 * 10 ** -decimals + 1e-12 for v in values)


def _cited(unit: str) -> list[str]:
    return sorted({m for m in CITATION.findall(unit)
                   if (RESULTS / f"{m}.md").is_file() or (RESULTS / f"{m}.json").is_file()})


def _figures(unit: str) -> list[str]:
    prose = re.sub(r"`[^`]*`", " ", unit)
    prose = VERSION.sub(" ", prose)
    prose = re.sub(r"\]\([^)]*\)", "]", prose)  # link targets
    return NUMBER.findall(prose)


def _cases() -> list[tuple[str, int, str, list[str]]]:
    cases = []
    for doc in DOCS:
        for line, unit in _units(doc.read_text()):
            cited = _cited(unit)
            if cited and _figures(unit):
                cases.append((doc.relative_to(ROOT).as_posix(), line, unit, cited))
    return cases


CASES = _cases()


def test_the_docs_cite_results_files():
    assert len(CASES) >= 5, "the figure check found almost nothing to check"


@pytest.mark.parametrize(("doc", "line", "unit", "cited"), CASES,
                         ids=[f"{c[0]}:{c[1]}" for c in CASES])
def test_every_figure_is_in_the_results_file_it_cites(doc, line, unit, cited):
    texts = [_results_numbers(stem) for stem in cited]
    missing = [f for f in _figures(unit)
               if not any(_matches(f, text, values) for text, values in texts)]
    assert not missing, (f"{doc}:{line} quotes {missing}, which {', '.join(cited)} do not hold")


def test_the_check_catches_a_figure_the_file_does_not_hold():
    text, values = _results_numbers("frontier")
    assert _matches("1.384", text, values) and _matches("1.752e+05", text, values)
    assert not _matches("1.3841", text, values) and not _matches("7.777", text, values)
    units = _units("Intro citing `frontier.md`: 1.384x.\n\n| a | b |\n|---|---|\n| 3.14 | x |\n")
    assert len(units) == 1 and _cited(units[0][1]) == ["frontier"]
    assert _figures(units[0][1]) == ["1.384", "3.14"]
