"""The mypyc build: the narrowing rule in the compiled modules, the build report,
and setup.py's pins and module list.

The narrowing rule (docs/internals.md, "Build"): mypy keeps ``self.attr`` narrowed
(``is not None``, ``isinstance``, truthiness) across a call, but a call to
``parser.feed_data()`` runs the parser's callbacks, which may change the attribute.
Pure Python just reads the new value; compiled code trusts the narrowed type and
fails (a TypeError on a None it ruled out) or misbehaves. The check below reads
the sources: in a function that calls ``feed_data``, an attribute of ``self``
tested before the call must not be read again after it (read it into a local).
"""

from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from zdproxy.buildinfo import build

ROOT = Path(__file__).resolve().parents[2]
COMPILED_PACKAGES = ("zdproxy/proxy", "zdproxy/http", "zdproxy/balancing")
CALLBACK_CALLS = {"feed_data"}


def _self_attr(node: ast.AST) -> str | None:
    if (
        isinstance(node, ast.Attribute)
        and isinstance(node.value, ast.Name)
        and node.value.id == "self"
    ):
        return node.attr
    return None


def _narrowed_attrs(test: ast.AST) -> set[str]:
    """Attributes of self that a condition narrows: ``self.a is None``, ``self.a``,
    ``not self.a``, ``isinstance(self.a, T)``, combined with and/or."""
    found: set[str] = set()
    if isinstance(test, ast.BoolOp):
        for value in test.values:
            found |= _narrowed_attrs(value)
    elif isinstance(test, ast.UnaryOp) and isinstance(test.op, ast.Not):
        found |= _narrowed_attrs(test.operand)
    elif isinstance(test, ast.Compare) and all(
        isinstance(op, ast.Is | ast.IsNot) for op in test.ops
    ):
        for side in (test.left, *test.comparators):
            attr = _self_attr(side)
            if attr is not None:
                found.add(attr)
    elif isinstance(test, ast.Call) and getattr(test.func, "id", None) == "isinstance":
        attr = _self_attr(test.args[0]) if test.args else None
        if attr is not None:
            found.add(attr)
    else:
        attr = _self_attr(test)
        if attr is not None:
            found.add(attr)
    return found


def _narrows_across(node: ast.AST, call_line: int) -> bool:
    """Whether the narrowing of a test before the call still holds at the call: the
    call is inside the ``if``/``while`` body, or the body always leaves (``if x is
    None: return``), or an ``assert``."""
    if isinstance(node, ast.Assert):
        return True
    if not isinstance(node, ast.If | ast.While):
        return False
    body_end = node.body[-1].end_lineno or node.body[-1].lineno
    if node.body[0].lineno <= call_line <= body_end:
        return True
    leaves = isinstance(node.body[-1], ast.Return | ast.Raise | ast.Continue | ast.Break)
    return leaves and body_end < call_line


def narrowing_violations(source: str, filename: str) -> list[str]:
    """``file:line: self.attr`` for every re-read of a narrowed attribute after a
    call that runs callbacks, in the same function."""
    problems: list[str] = []
    for func in ast.walk(ast.parse(source, filename)):
        if not isinstance(func, ast.FunctionDef | ast.AsyncFunctionDef):
            continue
        calls = [
            node.lineno
            for node in ast.walk(func)
            if isinstance(node, ast.Call)
            and isinstance(node.func, ast.Attribute)
            and node.func.attr in CALLBACK_CALLS
        ]
        if not calls:
            continue
        first_call = min(calls)
        narrowed: set[str] = set()
        for node in ast.walk(func):
            if _narrows_across(node, first_call) and node.lineno < first_call:  # type: ignore[attr-defined]
                narrowed |= _narrowed_attrs(node.test)  # type: ignore[attr-defined]
        for node in ast.walk(func):
            attr = _self_attr(node)
            if (
                attr in narrowed
                and isinstance(node.ctx, ast.Load)  # type: ignore[attr-defined]
                and node.lineno > first_call
            ):
                problems.append(f"{filename}:{node.lineno}: self.{attr}")
    return problems


def test_compiled_modules_follow_the_narrowing_rule() -> None:
    problems: list[str] = []
    for package in COMPILED_PACKAGES:
        for path in sorted((ROOT / package).glob("*.py")):
            problems += narrowing_violations(path.read_text(), str(path.relative_to(ROOT)))
    assert problems == [], "read these into a local before feed_data(), re-read after"


BAD = """
class P:
    def data_received(self, data):
        if self.exchange is None:
            return
        self.parser.feed_data(data)
        exchange = self.exchange  # narrowed to not-None, but a callback cleared it
"""

GOOD = """
class P:
    def data_received(self, data):
        exchange = self.exchange
        if exchange is None:
            return
        self.parser.feed_data(data)
        exchange = self.exchange
        if self.closed:  # tested only after the call: not narrowed across it
            return
"""


INSIDE = """
class P:
    def data_received(self, data):
        if self.exchange is not None:
            self.parser.feed_data(data)
            self.exchange.flush()
"""

BRANCH_ONLY = """
class P:
    def data_received(self, data):
        if self.exchange is not None:
            self.count += 1
        self.parser.feed_data(data)
        exchange = self.exchange  # the if body does not leave: no narrowing here
"""


def test_the_check_follows_where_narrowing_holds() -> None:
    assert narrowing_violations(INSIDE, "x.py") == ["x.py:6: self.exchange"]
    assert narrowing_violations(BRANCH_ONLY, "x.py") == []


@pytest.mark.parametrize(
    ("test", "narrows"),
    [
        ("self.exchange is None", True),
        ("self.exchange is not None and data", True),
        ("not self.exchange", True),
        ("isinstance(self.exchange, Exchange)", True),
        ("self.count > 3", False),
    ],
)
def test_the_check_sees_each_narrowing(test: str, narrows: bool) -> None:
    source = BAD.replace("self.exchange is None", test)
    assert bool(narrowing_violations(textwrap.dedent(source), "x.py")) == narrows


def test_the_check_passes_locals_and_later_tests() -> None:
    assert narrowing_violations(BAD, "x.py") == ["x.py:7: self.exchange"]
    assert narrowing_violations(GOOD, "x.py") == []


def test_setup_pins_the_same_build_tools_as_the_test_constraints() -> None:
    line = re.search(r"^BUILD_PINS = \[(.+)\]$", (ROOT / "setup.py").read_text(), re.M)
    assert line is not None
    pins = re.findall(r'"([^"]+)"', line.group(1))
    assert [pin.partition("==")[0] for pin in pins] == [
        "mypy",
        "pydantic",
        "PyYAML",
        "types-PyYAML",
    ]
    constraints = (ROOT / "requirements/test-constraints.txt").read_text().splitlines()
    assert [pin for pin in pins if pin not in constraints] == []


def test_the_build_reported_is_the_build_loaded() -> None:
    import zdproxy.proxy.exchange as probe

    compiled = not probe.__file__.endswith(".py")
    assert build() == ("compiled" if compiled else "pure")
    expected = os.environ.get("ZDPROXY_EXPECT_BUILD")
    if expected:  # scripts/test says which build it installed
        assert build() == expected


def test_version_names_the_build(tmp_path: Path) -> None:
    """The subprocess resolves zdproxy as the suite's own process does (away from
    the source tree, which would shadow the installed package)."""
    out = subprocess.run(
        [sys.executable, "-m", "zdproxy.cli", "--version"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    assert out == f"zdproxy 0.1.0 ({build()})\n"
