"""The CLI, the Python API and the README describe the same commands (after sqlite-utils'
test_docs): every command has a Python callable behind it, a row in the README's command table
and a working --help with an example; an option's name is the Python argument's name."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import inspect
import re
import textwrap
from collections.abc import Callable
from pathlib import Path
from typing import Any

import click
import pytest
from click.testing import CliRunner

from actstore.app.api import ActStore
from actstore.app.cli import main
from actstore.core.runtime import Runtime

README = Path(__file__).resolve().parents[1] / "README.md"
COMMANDS = sorted(main.commands)

# Commands with no ActStore method of their own: the documented function each one calls.
FUNCTIONS = {
    "merge": ["ingest.shards.merge"],
    "demo": ["actstore.app.demo.demo"],
    "path": ["queries.paths.path"],  # ActStore.path is the store's directory
}
# --repair runs ActStore.repair before ActStore.verify.
EXTRA_METHODS = {"verify": ["repair"]}

# Options whose Python argument has another name, each for a reason.
RENAMED = {
    ("export", "format"): "fmt",  # `format` is a builtin
    ("export", "output"): "out",
    ("plot", "output"): "out",
    ("report", "output"): "out",
    ("attention", "from"): "source",  # `from` is a keyword
}
# Options that are a Runtime's fields (--device, --workers, --scheduler): one `runtime` argument.
RUNTIME = {f.name for f in dataclasses.fields(Runtime)}
# Options of the command line only: how many rows to print, and in what format.
CLI_ONLY = {("attribute", "top"), ("patch", "top")} | {
    (c, "format") for c in COMMANDS if c != "export"
}


def _function(path: str) -> Callable[..., Any] | None:
    module, _, name = path.rpartition(".")
    try:
        return getattr(importlib.import_module(module), name)
    except ModuleNotFoundError:
        return None


def behind(command: str) -> list[Callable[..., Any]]:
    """The Python callables `actstore COMMAND` runs: ActStore methods, else named functions."""
    if command in FUNCTIONS:
        found = [f for f in map(_function, FUNCTIONS[command]) if f is not None]
        return found[:1]
    return [getattr(ActStore, name) for name in [command, *EXTRA_METHODS.get(command, [])]]


def _imported_in(fn: Callable[..., Any]) -> list[Callable[..., Any]]:
    """Functions that `fn` imports in its body (the API's lazy imports of its queries)."""
    tree = ast.parse(textwrap.dedent(inspect.getsource(fn)))
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.ImportFrom) and node.module:
            module = importlib.import_module(node.module)
            found += [getattr(module, a.name) for a in node.names]
    return [f for f in found if inspect.isfunction(f)]


def _filters(fn: Callable[..., Any]) -> type:
    """The Filters dataclass in `fn`'s module, or in a module it imports (`ov.Filters`)."""
    found = [fn.__globals__.get("Filters")]
    found += [getattr(v, "Filters", None) for v in fn.__globals__.values() if inspect.ismodule(v)]
    found = [f for f in found if f is not None]
    assert found, f"{fn.__qualname__} takes **kwargs but neither passes nor builds them"
    return found[0]


def arguments(fn: Callable[..., Any]) -> set[str]:
    """Names `fn` accepts, following **kwargs into the functions it imports and hands them to,
    or, where it imports none, into the fields of the Filters it builds from them."""
    names = set()
    for p in inspect.signature(fn).parameters.values():
        if p.kind == p.VAR_KEYWORD:
            callees = _imported_in(fn)
            for callee in callees:
                names |= arguments(callee)
            if not callees:
                names |= {f.name for f in dataclasses.fields(_filters(fn))}
        elif p.kind != p.VAR_POSITIONAL:
            names.add(p.name)
    return names


def options(command: str) -> list[str]:
    """The command's long option names as Python names (--top-k: top_k); hidden ones (an old
    spelling kept only to point to the new) left out."""
    found = []
    for param in main.commands[command].params:
        if isinstance(param, click.Option) and not param.hidden:
            long = [o for o in param.opts if o.startswith("--")]
            found.append(long[0][2:].replace("-", "_"))
    return found


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_a_documented_python_callable(command):
    fns = behind(command)
    assert fns, f"actstore {command}: no ActStore method and no function in FUNCTIONS"
    for fn in fns:
        assert inspect.getdoc(fn), f"{fn.__qualname__} has no docstring"


def test_option_names_are_python_argument_names():
    mismatched = {}
    for command in COMMANDS:
        accepted = set().union(*map(arguments, behind(command)))
        accepted |= set(EXTRA_METHODS.get(command, []))
        if "runtime" in accepted:
            accepted |= RUNTIME
        for name in options(command):
            if (command, name) in CLI_ONLY:
                continue
            python = RENAMED.get((command, name), name)
            assert python in accepted, f"actstore {command} --{name}: no Python argument {python}"
            if python != name:
                mismatched[command, name] = python
    assert mismatched == RENAMED, "RENAMED lists exactly the options named otherwise in Python"


def test_readme_table_lists_every_command():
    rows = re.findall(r"^\| `(\w+) [^`]*` \|", README.read_text(), flags=re.M)
    assert sorted(rows) == COMMANDS


@pytest.mark.parametrize("command", COMMANDS)
def test_help_shows_an_example(command):
    result = CliRunner().invoke(main, [command, "--help"])
    assert result.exit_code == 0, result.output
    assert f"Usage: main {command}" in result.output or f"{command} [OPTIONS]" in result.output
    assert "Example:" in result.output


# Notes that point outside the repository: a reader of the code cannot follow them.
OUTSIDE = re.compile(
    r"SPEC\.md|\bSPEC\b|STACK-NOTES|\b[Ii]ssue #?\d+|has not landed|lands from|another branch"
)


def test_no_notes_point_outside_the_repository():
    root = README.parent
    files = [README, root / "Makefile", root / "pyproject.toml", *root.glob("docs/*.md")]
    for package in ("actstore", "ingest", "queries", "tools", "tests", "benchmarks"):
        files += (root / package).rglob("*.py")
    found = [
        f"{path.relative_to(root)}:{n}: {line.strip()}"
        for path in files
        if path != Path(__file__).resolve()
        for n, line in enumerate(path.read_text().splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not found, "\n".join(found)


# A file of the repository (actstore/core/writes.py) or a dotted name in it
# (actstore.core.names.EDGE_NAME), as the README and docs name them.
NAMED_FILE = re.compile(
    r"(?<![\w./-])((?:actstore|ingest|queries|tools|benchmarks|tests)/[\w/]+\.py)"
)
NAMED_OBJECT = re.compile(r"(?<![\w./-])((?:actstore|ingest|queries)(?:\.[A-Za-z_]\w*)+)")
# `queries.params`: a column of the catalog's queries table, not the package.
QUERIES_COLUMNS = {"query_id", "kind", "run_id", "params", "params_hash", "created_at", "wall_s"}


def _resolves(name: str) -> bool:
    parts = name.split(".")
    if parts[0] == "queries" and len(parts) == 2 and parts[1] in QUERIES_COLUMNS:
        return True
    for i in range(len(parts), 0, -1):
        try:
            found: Any = importlib.import_module(".".join(parts[:i]))
        except ModuleNotFoundError:
            continue
        for attr in parts[i:]:
            if not hasattr(found, attr):
                return False
            found = getattr(found, attr)
        return True
    return False


def test_the_docs_name_only_places_that_exist():
    """Every module path and dotted name the README and the docs give is there: a reader who
    follows one to the engine, the reader, the writer or the runtime finds it."""
    root = README.parent
    missing = []
    for path in [README, *sorted(root.glob("docs/**/*.md"))]:
        text = path.read_text()
        missing += [f"{path.name}: {f}" for f in NAMED_FILE.findall(text)
                    if "NAME" not in f and not (root / f).exists()]  # fmt: skip
        missing += [f"{path.name}: {n}" for n in NAMED_OBJECT.findall(text) if not _resolves(n)]
    assert not missing, missing
