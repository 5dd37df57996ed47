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
  show, and may only check what the visible blocks did.

A page's visible code must run as a reader sees it: :func:`test_visible_code_runs_alone`
runs the page's visible Python blocks alone, in order, in a fresh interpreter, so a name
that only an invisible block defines fails there. Blocks run in a fresh temporary
directory, so files they write do not land in the clone.
"""

from __future__ import annotations

import contextlib
import doctest
import io
import os
import re
import subprocess
import sys
import unittest
from pathlib import Path

import pytest
from sybil import Example, Sybil
from sybil.evaluators.python import PythonEvaluator
from sybil.parsers.abstract.doctest import DocTestStringParser
from sybil.parsers.markdown import CodeBlockParser, PythonCodeBlockParser, SkipParser

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

#: Relative tolerance of a number in an ``output`` block against the number printed.
OUTPUT_RTOL = 1e-3
#: Absolute tolerance, for printed numbers near zero.
OUTPUT_ATOL = 1e-9

#: Where the Python evaluator leaves what the last block printed, for the output block.
PRINTED = "__printed__"
#: Where :data:`VISIBLE` collects a page's visible Python code: (first line, source) pairs.
VISIBLE_CODE = "__visible_code__"
#: The most seconds one page's visible code may run alone.
VISIBLE_TIMEOUT = 600

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


def collect_visible_code(example: Example) -> None:
    """Sybil evaluator that keeps a visible Python block (or doctest example) instead of running
    it; an invisible block is left out."""
    if example.document.text.startswith("<!--", example.start):
        return
    if isinstance(example.parsed, doctest.Example):
        first_line, source = example.line, example.parsed.source
    else:
        first_line, source = example.line + 1, str(example.parsed)  # the line after the fence
    example.document.namespace.setdefault(VISIBLE_CODE, []).append((first_line, source))


class VisibleCodeParser(PythonCodeBlockParser):
    """Sybil's parser of ```python blocks, doctests included, collecting what a reader sees."""

    def __init__(self) -> None:
        super().__init__()
        self.codeblock_parser = CodeBlockParser("python", collect_visible_code)
        self.doctest_parser = DocTestStringParser(collect_visible_code)


#: Parses a page as :data:`SYBIL` does (the same skips), collecting its visible Python code.
VISIBLE = Sybil(parsers=[VisibleCodeParser(), CodeBlockParser("output", lambda example: None), SkipParser()])


def visible_script(page: Path) -> str:
    """The page's visible Python code as one script, each line at its line number in the page
    (every other line blank), so a traceback points at the page's own line.

    Blocks a ``skip`` directive skips are left out, as are invisible blocks."""
    document = VISIBLE.parse(page)
    for example in document.examples():
        with contextlib.suppress(unittest.SkipTest):
            example.evaluate()
    lines = [""] * len(document.text.splitlines())
    for first_line, source in document.namespace.get(VISIBLE_CODE, []):
        for offset, line in enumerate(source.splitlines()):
            lines[first_line - 1 + offset] = line
    return "\n".join(lines) + "\n"


def run_visible_code(page: Path, tmp_path: Path) -> subprocess.CompletedProcess | None:
    """Run :func:`visible_script` of ``page`` in a fresh interpreter, in an empty directory
    under ``tmp_path``; None when the page shows no Python code."""
    script = visible_script(page)
    if not script.strip():
        return None
    path = tmp_path / f"{page.name}.py"  # line numbers in a traceback are the page's
    path.write_text(script, encoding="utf-8")
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    return subprocess.run(
        [sys.executable, str(path)], cwd=run_dir, env={**os.environ, "MPLBACKEND": "Agg"},
        capture_output=True, text=True, timeout=VISIBLE_TIMEOUT,
    )


@pytest.mark.parametrize("page", PAGES, ids=[str(p.relative_to(ROOT)) for p in PAGES])
def test_visible_code_runs_alone(page, tmp_path):
    """The page's visible Python blocks, alone, in order, run top to bottom in a fresh
    interpreter: nothing they use is defined only in an invisible block."""
    done = run_visible_code(page, tmp_path)
    if done is None:
        pytest.skip(f"{page.name} shows no Python code")
    if done.returncode != 0:
        pytest.fail(f"{page.relative_to(ROOT)}: its visible code fails when run alone as shown "
                    f"(line numbers are the page's):\n{done.stderr[-4000:]}")


def test_visible_code_check_fails_on_hidden_setup(tmp_path):
    """The check itself: invisible and skipped blocks are left out, doctests are kept, every
    line sits at its page line, and a name defined only invisibly fails at the line using it."""
    page = tmp_path / "page.md"
    page.write_text(
        "# A page\n"
        "\n"
        "<!-- invisible-code-block: python\n"
        "hidden = 1\n"
        "-->\n"
        "\n"
        "```python\n"
        "shown = 2\n"
        "```\n"
        "\n"
        '<!-- skip: next "needs a GPU" -->\n'
        "\n"
        "```python\n"
        "on_gpu = 3\n"
        "```\n"
        "\n"
        "```python\n"
        ">>> doubled = 2 * shown\n"
        ">>> doubled\n"
        "4\n"
        "```\n"
        "\n"
        "```python\n"
        "print(shown + hidden)\n"
        "```\n",
        encoding="utf-8",
    )
    lines = visible_script(page).splitlines()
    assert {number: line for number, line in enumerate(lines, 1) if line} == {
        8: "shown = 2", 18: "doubled = 2 * shown", 19: "doubled", 24: "print(shown + hidden)",
    }
    done = run_visible_code(page, tmp_path)
    assert done.returncode != 0
    assert 'page.md.py", line 24' in done.stderr and "NameError: name 'hidden'" in done.stderr


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
