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


def test_the_layout_names_every_module():
    """README's Layout section names every module of the shipped packages (the tasks by the
    task names they register), so that a reader finds each place in one guess."""
    root = README.parent
    text = README.read_text()
    layout = text[text.index("\n## Layout") :]
    words = set(re.findall(r"[\w-]+", layout))
    unnamed = [
        str(path.relative_to(root))
        for package in ("actstore", "ingest", "queries", "tools")
        for path in sorted((root / package).rglob("*.py"))
        if path.name != "__init__.py" and path.parent.name != "tasks"
        and path.stem not in words
    ]  # fmt: skip
    assert not unnamed, unnamed


def test_no_two_modules_share_a_base_name():
    """One name, one place: `from … import reader` or a traceback's file name is never
    ambiguous across the packages, tools, tests and benchmarks."""
    root = README.parent
    found: dict[str, list[str]] = {}
    for package in ("actstore", "ingest", "queries", "tools", "tests", "benchmarks"):
        for path in (root / package).rglob("*.py"):
            if path.name != "__init__.py":
                found.setdefault(path.name, []).append(str(path.relative_to(root)))
    assert {k: v for k, v in found.items() if len(v) > 1} == {}


def test_the_import_contracts_are_the_layers_and_ignore_nothing():
    """pyproject.toml's contracts, which lint-imports checks: the layers app > ingest | queries >
    model > core, torch kept out of the core and the analysis even indirectly, and no contract
    that ignores an import (an exception would hide a layer broken)."""
    import tomllib

    config = tomllib.loads((README.parent / "pyproject.toml").read_text())["tool"]["importlinter"]
    contracts = config["contracts"]
    assert not [c["name"] for c in contracts if c.get("ignore_imports")]
    layers = [c["layers"] for c in contracts if c["type"] == "layers"]
    assert layers == [["actstore.app", "ingest | queries", "actstore.model", "actstore.core"]]
    torch_free = [c for c in contracts if "torch" in c.get("forbidden_modules", [])]
    assert len(torch_free) == 1 and not torch_free[0].get("allow_indirect_imports")
    assert set(torch_free[0]["source_modules"]) == {"actstore.core", "queries.analysis"}


def defaults(fn: Callable[..., Any]) -> dict[str, Any]:
    """The default of each argument `fn` accepts (following **kwargs as `arguments` does; an
    argument without one maps to None)."""
    found: dict[str, Any] = {}
    for p in inspect.signature(fn).parameters.values():
        if p.kind == p.VAR_KEYWORD:
            for callee in _imported_in(fn):
                found |= defaults(callee)
            if not _imported_in(fn):
                found |= {f.name: f.default for f in dataclasses.fields(_filters(fn))}
        elif p.kind != p.VAR_POSITIONAL:
            found[p.name] = None if p.default is p.empty else p.default
    return found


# Options whose default the command line spells otherwise than the Python argument, each the
# same value: the demo's tasks as one comma-separated option, ingest's hook preset by its name.
SPELLED = {("demo", "tasks"): ("ioi,colored-objects", ("ioi", "colored-objects")),
           ("ingest", "hooks"): ("default", None)}  # fmt: skip


def option_defaults() -> list[tuple[str, str, str, click.Option, dict[str, Any]]]:
    """(command, long option name as a Python name, its Python argument, the option, the
    defaults of the functions behind the command) for every visible option of every command."""
    found = []
    for command in COMMANDS:
        accepted: dict[str, Any] = {}
        for fn in behind(command):
            accepted |= defaults(fn)
        for param in main.commands[command].params:
            if isinstance(param, click.Option) and not param.hidden:
                name = [o for o in param.opts if o.startswith("--")][0][2:].replace("-", "_")
                python = RENAMED.get((command, name), name)
                found.append((command, name, python, param, accepted))
    return found


def test_an_options_default_is_its_python_arguments():
    """The command line shows each option's default in --help, read from the function's
    source (importing it would import torch): it is the value Python gives the function, for
    every command an option is shared by too."""
    differ = {}
    for command, name, python, param, accepted in option_defaults():
        if (command, name) in CLI_ONLY or python in RUNTIME or python not in accepted:
            continue
        cli = param.default if param.default not in (None, click.core.UNSET) else None
        cli = False if param.is_flag and cli is None else cli
        if (cli, accepted[python]) != SPELLED.get((command, name), (cli, cli)):
            differ[f"{command} --{name}"] = (cli, accepted[python])
    assert not differ, differ


def written_defaults() -> list[tuple[str, Any]]:
    """(long option name, value) of each `click.option` in cli.py whose default is written there
    as a literal, not read from the function behind the command."""
    import actstore.app.cli as cli

    found = []
    for node in ast.walk(ast.parse(Path(cli.__file__).read_text())):
        if not (isinstance(node, ast.Call) and ast.unparse(node.func) == "click.option"):
            continue
        names = [a.value for a in node.args if isinstance(a, ast.Constant)]
        long = [n for n in names if isinstance(n, str) and n.startswith("--")][0]
        for keyword in node.keywords:
            if keyword.arg == "default":
                try:
                    found.append((long.split("/")[0], ast.literal_eval(keyword.value)))
                except ValueError:
                    pass
    return found


def test_no_option_writes_a_default_its_function_has():
    """Each option's default is written once, in the function behind its command, and read from
    there (actstore/app/defaults.py): a literal default in cli.py is the command line's own
    (--format table) or one it spells otherwise (SPELLED), never a second copy."""
    written = written_defaults()
    assert ("--format", "table") in written and ("--hooks", "default") in written
    twice = {
        f"{command} {long}": param.default
        for command, name, python, param, accepted in option_defaults()
        if (long := f"--{name.replace('_', '-')}", param.default) in written
        and accepted.get(python) is not None
    }
    assert not twice, f"defaults written in cli.py beside the function's: {twice}"
