"""Python functions' argument defaults, read from their source without importing them.

The command line shows each option's default in `--help`, yet the functions that define them
(ingest's runner, the queries, the API) import torch, which `actstore --help`, `info` and `sql`
must not. So the CLI takes each default from the function's signature as written: its module is
found on disk (never imported), parsed with `ast`, and the default evaluated as a literal or as
a module constant it names (`END`, `sandbox.TIMEOUT_S`). Anything else is refused with a
`SourceDefaultError` when the CLI asks for it, at import, so that a test catches it. Each file
is read once per process.
"""

from __future__ import annotations

import ast
import functools
import importlib.util
import re
import textwrap
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any


class SourceDefaultError(LookupError):
    """A default the source does not give as a literal or a module constant (a programming
    error of the command line, raised as it is imported)."""


def defaults(module: str, name: str) -> Mapping[str, Any]:
    """The defaults of `module.name` (a function, or `Class.method`), by argument name.

    A function re-exported by a package (`from queries.patching.patch import patch` in
    `queries/patching/__init__.py`) is followed to where it is defined."""
    return _defaults(module, name)


class _Defaults(Mapping[str, Any]):
    """One function's defaults, each evaluated when asked for (an argument whose default is
    not a literal, like `runtime=Runtime()`, is refused only if asked for)."""

    def __init__(self, where: str, module: str, function: ast.FunctionDef):
        self.where, self.module = where, module
        args = function.args
        positional = args.posonlyargs + args.args
        given = zip(positional[len(positional) - len(args.defaults) :], args.defaults, strict=True)
        keyword = zip(args.kwonlyargs, args.kw_defaults, strict=True)
        self.nodes = {a.arg: d for a, d in [*given, *keyword] if d is not None}

    def __getitem__(self, argument: str) -> Any:
        if argument not in self.nodes:
            raise SourceDefaultError(f"{self.where}: no argument {argument!r} with a default")
        try:
            return _value(self.nodes[argument], self.module)
        except SourceDefaultError as exc:
            raise SourceDefaultError(f"{self.where}({argument}=…): {exc}") from None

    def __contains__(self, argument: object) -> bool:
        return argument in self.nodes

    def __iter__(self) -> Iterator[str]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)


@functools.cache
def _defaults(module: str, name: str) -> _Defaults:
    found = _lookup(module, name.split("."))
    if not isinstance(found, tuple):
        raise SourceDefaultError(f"{module}.{name}: not a function defined in its source")
    where, function = found
    return _Defaults(f"{where}.{name}", where, function)


def _lookup(module: str, path: list[str]) -> tuple[str, ast.FunctionDef] | None:
    """The function at `path` (name, or class then method) in `module`, following a top-level
    `from X import name` into X."""
    function = _function(module, path)
    if function is not None:
        return module, function
    imported = _imported(module, path[0]) if len(path) == 1 else None
    return None if imported is None else _lookup(imported[0], [imported[1]])


def _function(module: str, path: list[str]) -> ast.FunctionDef | None:
    """The function's `def` line(s) alone, parsed: the last `def name(` at the top level (or in
    the class's body, four spaces in, as ruff formats it). Parsing every module behind the
    commands whole would slow `actstore --help` by tens of ms."""
    text, start, end, indent = _text(module), 0, None, ""
    for part in path[:-1]:
        found = list(re.finditer(rf"^{indent}class {re.escape(part)}\b.*$", text, re.M))
        if not found:
            return None
        start = found[-1].end()
        after = re.compile(rf"^ {{0,{len(indent)}}}\S", re.M).search(text, start)
        end = after.start() if after else None
        indent += "    "
    body = text[start:end]
    found = list(re.finditer(rf"^{indent}def {re.escape(path[-1])}\(", body, re.M))
    if not found:
        return None
    lines = body[found[-1].start() :].splitlines()
    for n, line in enumerate(lines, 1):
        if line.rstrip().endswith(":"):
            try:
                tree = ast.parse(textwrap.dedent("\n".join(lines[:n])) + "\n    ...")
            except SyntaxError:
                continue
            function = tree.body[0]
            return function if isinstance(function, ast.FunctionDef) else None
    return None


def _imported(module: str, name: str) -> tuple[str, str] | None:
    """(module, name) that `module` binds `name` to by a top-level `from … import`."""
    for node in _tree(module).body:
        if isinstance(node, ast.ImportFrom) and node.module and not node.level:
            for alias in node.names:
                if (alias.asname or alias.name) == name:
                    return node.module, alias.name
    return None


def _value(node: ast.expr, module: str) -> Any:
    """A default's value: a literal, or a module constant it names (in `module`, imported into
    it, or `alias.NAME` of a module imported into it)."""
    try:
        return ast.literal_eval(node)
    except ValueError:
        pass
    if isinstance(node, ast.Name):
        return _constant(module, node.id)
    if isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name):
        imported = _imported(module, node.value.id)
        if imported is not None and _exists(".".join(imported)):
            return _constant(".".join(imported), node.attr)
    raise SourceDefaultError(f"{ast.unparse(node)} is neither a literal nor a module constant")


def _constant(module: str, name: str) -> Any:
    """The value of `module`'s top-level `name = …` (the last one), or of the name it imports."""
    for node in reversed(_tree(module).body):
        if isinstance(node, ast.Assign | ast.AnnAssign) and node.value is not None:
            targets = node.targets if isinstance(node, ast.Assign) else [node.target]
            for target in targets:
                if isinstance(target, ast.Name) and target.id == name:
                    return _value(node.value, module)
                if isinstance(target, ast.Tuple) and isinstance(node.value, ast.Tuple):
                    names = [t.id if isinstance(t, ast.Name) else None for t in target.elts]
                    if name in names and len(names) == len(node.value.elts):
                        return _value(node.value.elts[names.index(name)], module)
    imported = _imported(module, name)
    if imported is not None:
        return _constant(*imported)
    raise SourceDefaultError(f"{module} has no top-level constant {name}")


# A top-level statement that binds names (an import or an assignment), with its continuation
# lines: what `_imported` and `_constant` read, without parsing the module's functions.
BINDING = re.compile(
    r"^(?:from |import |[A-Za-z_][\w, ]*(?::[^=\n]*)?=).*(?:\n(?:[ )\]}].*)?)*", re.M
)


@functools.cache
def _tree(module: str) -> ast.Module:
    """`module`'s top-level imports and assignments, parsed (the whole module where those
    alone do not parse)."""
    text = _text(module)
    try:
        return ast.parse("\n".join(m.group(0) for m in BINDING.finditer(text)))
    except SyntaxError:
        return ast.parse(text, filename=str(_path(module)))


@functools.cache
def _text(module: str) -> str:
    """`module`'s source (never imported: no parent package's `__init__` runs)."""
    path = _path(module)
    if path is None:
        raise SourceDefaultError(f"no source file for module {module}")
    return path.read_text()


def _exists(module: str) -> bool:
    return _path(module) is not None


@functools.cache
def _path(module: str) -> Path | None:
    """The file of `module`, found from its top-level package's directory: `find_spec` of a
    dotted name would import its parents, which may import torch."""
    top, *rest = module.split(".")
    spec = importlib.util.find_spec(top)
    if spec is None:
        return None
    if not rest:
        return Path(spec.origin) if spec.origin else None
    if not spec.submodule_search_locations:
        return None
    for base in spec.submodule_search_locations:
        path = Path(base, *rest)
        for candidate in (path.with_suffix(".py"), path / "__init__.py"):
            if candidate.is_file():
                return candidate
    return None
