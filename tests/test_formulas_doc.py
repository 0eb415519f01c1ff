"""docs/formulas.md against the code: every formula ID the code cites has a row, every row is named by a
test, and the functions and tests a row lists exist and cite the row's ID.

What counts as a formula ID (``ID_RE``): one of the family letters S, F, P, K, L, A, V, X, Q, R followed by a
number 1–99 with no leading zero, with no letter or digit on either side. An underscore separates, so the
test name ``test_S1_P1_posterior_variance_anchors`` names S1 and P1, and "S1/S2:", "(A1, A2)", "P1's" cite
IDs; "sha256", "float32", "TS20", "LN2", "X0", "A100", "K8s" do not. Two uses of such tokens that are not
formula IDs are excluded by name: the dtype shorthands F16/F32/F64 (export/sampler_graph.py), and "L1"/"L2"
followed by norm, distance, error, loss, penalty or regularisation ("the L2 distance of quantile
functions"). A range of one family ("A1–A9", with an en or em dash, a hyphen or "..") cites every ID in it.

Where the code cites IDs: the comments and string literals (docstrings included) of every Python file of
the repository outside hidden, build and virtual-environment folders (reference/, engine/, export/,
src/ldmkit/ or ldmkit/, benchmarks/, examples/, tests/), each file once however many symlinks reach it,
plus the names of test functions. Code identifiers are not read (``F32 = TensorProto.FLOAT``).

Where a test names an ID: in the test function's name, its docstring, or a comment or string literal in
its source (decorators included), in tests/test_*.py. A range does not count there: a test that names
"S1–S12" proves none of them in particular.
"""

from __future__ import annotations

import ast
import importlib
import os
import re
import tokenize
from functools import cache
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "formulas.md"
THIS = Path(__file__).resolve()

FAMILIES = "SFPKLAVXQR"
ID_RE = re.compile(
    r"(?<![A-Za-z0-9])"  # not the tail of a word: TS20, LN2, sha256, float32
    r"(?!F(?:16|32|64)(?![0-9A-Za-z]))"  # dtype shorthands, not formulas F16/F32/F64
    r"([SFPKLAVXQR][1-9][0-9]?)"
    r"(?![0-9A-Za-z])"  # not the head of a word: A100, K8s
    r"(?!(?<=L[12])[\s-]+(?:norm|distance|error|loss|penalt|regularis|regulariz))"  # the L1/L2 norm
)
RANGE_RE = re.compile(r"(?<![A-Za-z0-9])([SFPKLAVXQR])([1-9][0-9]?)\s*(?:–|—|-|\.\.)\s*\1([1-9][0-9]?)(?![0-9A-Za-z])")

SKIP_DIRS = {"build", "dist", "node_modules", "__pycache__", "venv", "runs", "docs", "golden"}
TEXT_TOKENS = {tokenize.COMMENT, tokenize.STRING} | (
    {tokenize.FSTRING_MIDDLE} if hasattr(tokenize, "FSTRING_MIDDLE") else set())

FUNC_RE = re.compile(r"`(ldmkit\.reference\.[A-Za-z_][A-Za-z0-9_.]*)`")
TEST_RE = re.compile(r"`(tests/test_[A-Za-z0-9_]+\.py::[A-Za-z_][A-Za-z0-9_:]*)`")


def ids_in(text: str, ranges: bool) -> set[str]:
    """The formula IDs cited in ``text``; with ``ranges`` a range "A1–A9" cites A1..A9, without it none."""
    found = set()
    if ranges:
        for m in RANGE_RE.finditer(text):
            found |= {f"{m.group(1)}{n}" for n in range(int(m.group(2)), int(m.group(3)) + 1)}
    return found | set(ID_RE.findall(RANGE_RE.sub(" ", text)))


def _key(formula_id: str):
    return FAMILIES.index(formula_id[0]), int(formula_id[1:])


@cache
def python_files() -> tuple[Path, ...]:
    """Every Python file of the repository once (the first path found when symlinks reach it twice)."""
    seen_dirs, seen_files, out = set(), set(), []
    for dirpath, dirnames, filenames in os.walk(ROOT, followlinks=True):
        real_dir = os.path.realpath(dirpath)
        if real_dir in seen_dirs:
            dirnames[:] = []
            continue
        seen_dirs.add(real_dir)
        dirnames[:] = sorted(d for d in dirnames
                             if not d.startswith(".") and d not in SKIP_DIRS and not d.endswith(".egg-info"))
        for name in sorted(filenames):
            path = Path(dirpath) / name
            real = path.resolve()
            if name.endswith(".py") and real != THIS and real not in seen_files:
                seen_files.add(real)
                out.append(path)
    return tuple(out)


@cache
def _text_tokens(path: Path) -> tuple[tuple[int, str], ...]:
    """(line, text) of each comment and string literal of a Python file, and of each test_* name in it."""
    out = []
    with tokenize.open(path) as f:
        for tok in tokenize.generate_tokens(f.readline):
            if tok.type in TEXT_TOKENS or (tok.type == tokenize.NAME and tok.string.startswith("test_")):
                out.append((tok.start[0], tok.string))
    return tuple(out)


@cache
def code_citations() -> dict[str, tuple[str, ...]]:
    """{ID: ("path:line", ...)} for every ID cited in the repository's Python code (ranges expanded)."""
    sites: dict[str, list[str]] = {}
    for path in python_files():
        rel = path.relative_to(ROOT).as_posix()
        for line, text in _text_tokens(path):
            for formula_id in ids_in(text, ranges=True):
                sites.setdefault(formula_id, []).append(f"{rel}:{line}")
    return {k: tuple(v) for k, v in sites.items()}


@cache
def named_by_tests() -> dict[str, frozenset[str]]:
    """{"tests/test_x.py::test_name" (or ::Class::test_name): the IDs the test names}, ranges not counted."""
    out = {}
    for path in sorted((ROOT / "tests").glob("test_*.py")):
        if path.resolve() == THIS:  # this file's examples of IDs prove nothing
            continue
        tokens = _text_tokens(path)
        tree = ast.parse(path.read_text(encoding="utf-8"))
        found = [(n, n.name) for n in tree.body if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for cls in (n for n in tree.body if isinstance(n, ast.ClassDef) and n.name.startswith("Test")):
            found += [(n, f"{cls.name}::{n.name}") for n in cls.body
                      if isinstance(n, (ast.FunctionDef, ast.AsyncFunctionDef))]
        for node, qualname in found:
            if not node.name.startswith("test_"):
                continue
            first = min([node.lineno] + [d.lineno for d in node.decorator_list])
            named = ids_in(node.name, ranges=False)
            for line, text in tokens:
                if first <= line <= node.end_lineno:
                    named |= ids_in(text, ranges=False)
            out[f"tests/{path.name}::{qualname}"] = frozenset(named)
    return out


@cache
def doc_rows() -> dict[str, dict]:
    """{ID: {"line", "cells", "functions", "tests"}} from the tables of docs/formulas.md."""
    assert DOC.is_file(), f"{DOC.relative_to(ROOT)} is missing"
    rows: dict[str, dict] = {}
    for lineno, line in enumerate(DOC.read_text(encoding="utf-8").splitlines(), 1):
        cells = [c.strip() for c in re.split(r"(?<!\\)\|", line.strip())[1:-1]] if line.startswith("|") else []
        if not cells or not re.fullmatch(r"[SFPKLAVXQR][1-9][0-9]?", cells[0]):
            continue
        assert cells[0] not in rows, f"docs/formulas.md:{lineno}: a second row for {cells[0]}"
        assert len(cells) == 5, f"docs/formulas.md:{lineno}: {cells[0]} has {len(cells)} cells, not 5"
        rows[cells[0]] = {"line": lineno, "cells": cells, "functions": FUNC_RE.findall(cells[3]),
                          "tests": TEST_RE.findall(cells[4])}
    assert rows, "docs/formulas.md has no formula rows"
    return rows


def _resolve(dotted: str):
    """The object at ``ldmkit.reference.<module>.<name>[.<attr>...]``; AttributeError/ImportError if absent."""
    parts = dotted.split(".")
    obj = importlib.import_module(".".join(parts[:3]))
    for attr in parts[3:]:
        obj = getattr(obj, attr)
    return obj


# ----------------------------------------------------------------------------------------------------------
def test_id_definition_catches_citations_and_nothing_else():
    """The ID regex on the ways the code cites formulas, and on look-alikes that are not formula IDs."""
    assert ids_in('"""S1/S2: β_t evenly spaced', True) == {"S1", "S2"}
    assert ids_in("def test_S1_P1_posterior_variance_anchors", True) == {"S1", "P1"}
    assert ids_in("A2 (via P6, P7): one DDIM step; P1's mean; (L5)", True) == {"A2", "P6", "P7", "P1", "L5"}
    assert ids_in("FORMULAS L1–L11, with K1/K3–K5", True) == {f"L{n}" for n in range(1, 12)} | {"K1", "K3", "K4", "K5"}
    assert ids_in("FORMULAS L1–L11, with K1/K3–K5", False) == {"K1"}
    assert ids_in("L3: the L2 weight for σ_t² = β̃_t", True) == {"L3", "L2"}
    assert ids_in('"""Q1: Fréchet distance; Q1–Q2', True) == {"Q1", "Q2"}
    for text in ("sha256", "float32", "TS20 = timesteps(20, T)", "LN2", "X0, XP = meshgrid", "A100 GPU", "K8s",
                 "to=F32", "F64", "the L2 distance of quantile functions", "an L1-norm", "L2 loss", "S0", "P03",
                 "x_t1", "W2² = Σ", "H200"):
        assert ids_in(text, True) == set(), text


def test_every_id_cited_in_code_has_a_row():
    """(a) Every formula ID cited in the repository's Python code resolves to a row of docs/formulas.md."""
    rows, cited = doc_rows(), code_citations()
    assert cited, "no formula ID found in the code: the scan is broken"
    missing = sorted(set(cited) - set(rows), key=_key)
    assert not missing, "cited in the code but with no row in docs/formulas.md: " + "; ".join(
        f"{i} (at {', '.join(cited[i][:3])}{', …' if len(cited[i]) > 3 else ''})" for i in missing)


def test_every_row_is_named_by_a_test():
    """(b) Every ID that docs/formulas.md lists is named by at least one test (name, docstring, comment)."""
    named = set().union(*named_by_tests().values())
    unproved = sorted(set(doc_rows()) - named, key=_key)
    assert not unproved, f"rows of docs/formulas.md that no test in tests/ names: {unproved}"


def test_every_row_names_functions_that_exist_and_cite_it():
    """(c) Each function a row lists exists in ldmkit.reference and its docstring cites the row's ID."""
    problems = []
    for formula_id, row in doc_rows().items():
        if not row["functions"]:
            problems.append(f"{formula_id} (line {row['line']}) lists no ldmkit.reference function")
        for dotted in row["functions"]:
            try:
                obj = _resolve(dotted)
            except (ImportError, AttributeError) as exc:
                problems.append(f"{formula_id}: {dotted} does not exist ({exc})")
                continue
            if formula_id not in ids_in(getattr(obj, "__doc__", None) or "", ranges=False):
                problems.append(f"{formula_id}: the docstring of {dotted} does not cite {formula_id}")
    assert not problems, "\n".join(problems)


def test_every_row_names_tests_that_exist_and_name_it():
    """(c) Each test a row lists exists and names the row's ID."""
    tests, problems = named_by_tests(), []
    for formula_id, row in doc_rows().items():
        if not row["tests"]:
            problems.append(f"{formula_id} (line {row['line']}) lists no test")
        for name in row["tests"]:
            if name not in tests:
                problems.append(f"{formula_id}: {name} does not exist")
            elif formula_id not in tests[name]:
                problems.append(f"{formula_id}: {name} does not name {formula_id}")
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("name", ["diffusers.md", "anchors.md"])
def test_linked_pages_exist(name):
    """The pages docs/formulas.md links to are there."""
    assert f"({name}" in DOC.read_text(encoding="utf-8")
    assert (ROOT / "docs" / name).is_file()
