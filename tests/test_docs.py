"""The documentation runs: every Python block of README.md and docs/*.md, with its output.

Each page is parsed by Sybil and its examples are evaluated in page order in one namespace,
so a block sees what the blocks above it defined (one test per page: pytest-xdist cannot
split a page between workers). The markup a page uses:

- a ```` ```python ```` block is executed; a block starting with ``>>>`` is a doctest;
- an ```` ```output ```` block right after a Python block is what that block prints. Text is
  compared with whitespace normalized, ``...`` matches anything (a time, a path), and every
  number must agree with the printed one to within :data:`OUTPUT_RTOL` (relative) or
  :data:`OUTPUT_ATOL` (absolute, for numbers near zero); a ```` ```text ```` block is
  illustrative output and is not checked;
- ``<!-- skip: next "reason" -->`` before a block skips it in the tests, saying why (a GPU,
  a long benchmark); ``<!-- invisible-code-block: python -->`` runs code the page does not
  show (a setup a reader does not need).

Blocks run in a fresh temporary directory, so files they write do not land in the clone.
"""

from __future__ import annotations

import contextlib
import io
import re
import unittest
from pathlib import Path

import pytest
from sybil import Example, Sybil
from sybil.evaluators.python import PythonEvaluator
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: Relative tolerance of a number in an ``output`` block against the number printed.
OUTPUT_RTOL = 1e-3
#: Absolute tolerance, for printed numbers near zero.
OUTPUT_ATOL = 1e-9

#: Where the Python evaluator leaves what the last block printed, for the output block.
PRINTED = "__printed__"

NUMBER = r"[-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?"


class PrintingPythonEvaluator(PythonEvaluator):
    """Sybil's Python evaluator, keeping what the block printed for the output block below it."""

    def __call__(self, example: Example) -> None:
        __tracebackhide__ = True
        printed = io.StringIO()
        try:
            with contextlib.redirect_stdout(printed):
                super().__call__(example)
        finally:
            example.namespace[PRINTED] = printed.getvalue()
            print(printed.getvalue(), end="")


class PrintingPythonCodeBlockParser(PythonCodeBlockParser):
    """Sybil's parser of ```python blocks (doctests included), with the printing evaluator."""

    def __init__(self) -> None:
        super().__init__()
        self.codeblock_parser = CodeBlockParser("python", PrintingPythonEvaluator())


def output_pattern(expected: str) -> tuple[re.Pattern, list[float]]:
    """A regex for the printed text (numbers captured, ``...`` a wildcard, whitespace loose),
    and the numbers of ``expected`` in the order the regex captures them."""
    pattern, numbers = [], []
    for token in re.findall(rf"\.\.\.|{NUMBER}|\s+|.", expected.strip()):
        if token == "...":
            pattern.append(r".*?")
        elif token.isspace():
            pattern.append(r"\s+")
        elif re.fullmatch(NUMBER, token):
            pattern.append(rf"({NUMBER})")
            numbers.append(float(token))
        else:
            pattern.append(re.escape(token))
    return re.compile("".join(pattern), re.DOTALL), numbers


def check_output(example: Example) -> str | None:
    """Sybil evaluator of an ``output`` block: None when it matches, else what differs."""
    printed = example.namespace.pop(PRINTED, None)
    if printed is None:
        return "an output block must follow a Python block that ran"
    pattern, wanted = output_pattern(example.parsed)
    match = pattern.fullmatch(printed.strip())
    if match is None:
        return f"printed text differs from the output block:\n{printed}\nexpected:\n{example.parsed}"
    for want, got in zip(wanted, map(float, match.groups())):
        if abs(got - want) > max(OUTPUT_ATOL, OUTPUT_RTOL * abs(want)):
            return f"printed {got} where the output block says {want} (rtol {OUTPUT_RTOL}):\n{printed}"
    return None


SYBIL = Sybil(
    parsers=[PrintingPythonCodeBlockParser(), CodeBlockParser("output", check_output), SkipParser()],
)


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_page_runs(page, tmp_path, monkeypatch):
    """Every block of the page runs in order, and every output block matches what was printed."""
    monkeypatch.chdir(tmp_path)
    document = SYBIL.parse(page)
    skipped = []
    ran = 0
    for example in document.examples():
        try:
            example.evaluate()
        except unittest.SkipTest as skip:
            skipped.append(f"line {example.line}: {skip}")
        else:
            ran += 1
    if skipped:
        print(f"{page.name}: skipped", *skipped, sep="\n  ")
    assert ran or not skipped, f"{page.name}: every block was skipped"


@pytest.mark.parametrize(
    ("expected", "printed", "agrees"),
    [
        ("sigma 1.2345", "sigma 1.23456", True),  # within OUTPUT_RTOL
        ("sigma 1.2345", "sigma 1.2400", False),
        ("sigma 1.2345", "sigma 1.2345 extra", False),
        ("time ... ms, sigma 2.0", "time 13.2 ms, sigma 2.0000001", True),
        ("[0.5, 1e-3]", "[0.5,   0.001]", True),
        ("shape (3, 4)", "shape (3, 5)", False),
    ],
)
def test_output_check(expected, printed, agrees):
    """The output check itself: numbers within tolerance, text exact, ``...`` a wildcard."""

    class FakeExample:
        namespace = {PRINTED: printed}
        parsed = expected

    assert (check_output(FakeExample()) is None) == agrees
