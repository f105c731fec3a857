"""Console sessions as the README shows them: run actstore commands in one directory, write
them as a ```console block (`$ command`, then its output), and read such blocks back.

`make readme` runs `cog` over README.md, whose blocks call `session(...)` to regenerate their
output; tests/test_readme.py reads the blocks back, runs every command again in a fresh
directory and compares what the README promises: the ids, the table columns and the row counts.
Floating-point values are left out of the comparison (they move with library versions).
"""

from __future__ import annotations

import csv
import io
import os
import re
import shlex
import subprocess
import tempfile
import warnings
from dataclasses import dataclass, field
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")  # the toy models need no network; nothing may
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")  # reach the hub while the README is made

STDERR_MARK = "  (stderr)"
# One directory per named session, so that a README's blocks can continue one another.
_DIRS: dict[str, Path] = {}


@dataclass
class Step:
    """One command and what it printed (stderr lines are shown first, marked)."""

    command: str
    stdout: list[str] = field(default_factory=list)
    stderr: list[str] = field(default_factory=list)
    returncode: int = 0


def run(command: str, cwd: Path) -> Step:
    """Run `actstore ARGS [| shell pipeline]` in `cwd`: the actstore part in this process
    through click's test runner (one import of the stack for a whole session, where a
    subprocess per command would pay it each time), the pipeline after it by bash."""
    from click.testing import CliRunner

    from actstore.app.cli import main

    flat = command.replace("\\\n", " ")
    cut = _first_pipe(flat)
    words = shlex.split(flat[:cut])
    if words[0] != "actstore":
        raise ValueError(f"README commands start with actstore: {command!r}")
    before = Path.cwd()
    os.chdir(cwd)
    try:
        with warnings.catch_warnings():  # library deprecation notes are not the command's output
            warnings.simplefilter("ignore")
            result = CliRunner().invoke(main, words[1:])
    finally:
        os.chdir(before)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    stdout, code = result.stdout, result.exit_code
    if cut < len(flat):
        pipeline = ["bash", "-o", "pipefail", "-c", flat[cut + 1 :]]
        piped = subprocess.run(
            pipeline, cwd=cwd, input=stdout, capture_output=True, text=True, check=True
        )
        stdout = piped.stdout
    return Step(command, stdout.splitlines(), result.stderr.splitlines(), code)


def _first_pipe(text: str) -> int:
    """Index of the first | outside quotes (len(text) if none)."""
    quote = None
    for i, char in enumerate(text):
        if quote:
            quote = None if char == quote else quote
        elif char in "'\"":
            quote = char
        elif char == "|":
            return i
    return len(text)


def commands(script: str) -> list[str]:
    """The commands of a script: one per line; a line ending in a backslash, or inside an open
    quote, continues on the next."""
    out: list[str] = []
    current: list[str] = []
    for line in script.strip().splitlines():
        if not current and not line.strip():
            continue
        current.append(line)
        text = "\n".join(current)
        if text.endswith("\\") or not _balanced(text):
            continue
        out.append(text)
        current = []
    if current:
        raise ValueError(f"unfinished command: {current}")
    return out


def _balanced(text: str) -> bool:
    try:
        shlex.split(text)
    except ValueError:
        return False
    return True


def render(steps: list[Step]) -> str:
    lines = ["```console"]
    for step in steps:
        lines.append("$ " + step.command)
        lines += [line + STDERR_MARK for line in step.stderr]
        lines += step.stdout
    return "\n".join(lines + ["```"]) + "\n"


def session(name: str, script: str) -> None:
    """Run a script's commands in the session's directory and write the console block (cog);
    a command failing unexpectedly stops generation, so the README never shows it."""
    import cog

    cwd = _DIRS.setdefault(name, Path(tempfile.mkdtemp(prefix=f"readme-{name}-")))
    steps = []
    for command in commands(script):
        step = run(command, cwd)
        failed = step.returncode != 0
        if failed != any(line.startswith("error:") for line in step.stderr):
            raise RuntimeError(f"{command!r} exited {step.returncode}: {step.stderr[-3:]}")
        steps.append(step)
    cog.out(render(steps))


def demo_block() -> None:
    """The output of `actstore demo demo-store` (what `make demo` runs), as a ```text block."""
    import cog

    from actstore.app.demo import demo

    root = Path(tempfile.mkdtemp(prefix="readme-demo-")) / "demo-store"
    out = io.StringIO()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        demo(root, out=out)
    cog.out("```text\n" + out.getvalue().replace(str(root), "demo-store") + "```\n")


def parse(markdown: str) -> list[list[Step]]:
    """Every ```console block of a markdown text, as the steps it shows."""
    blocks = []
    for body in re.findall(r"^```console\n(.*?)^```", markdown, flags=re.M | re.S):
        steps: list[Step] = []
        lines = body.splitlines()
        i = 0
        while i < len(lines):
            if not lines[i].startswith("$ "):
                raise ValueError(f"console block line outside a command: {lines[i]!r}")
            command = [lines[i][2:]]
            i += 1
            while not _balanced("\n".join(command)) or command[-1].endswith("\\"):
                command.append(lines[i])
                i += 1
            step = Step("\n".join(command))
            while i < len(lines) and not lines[i].startswith("$ "):
                if lines[i].endswith(STDERR_MARK):
                    step.stderr.append(lines[i][: -len(STDERR_MARK)])
                else:
                    step.stdout.append(lines[i])
                i += 1
            step.returncode = 1 if any(s.startswith("error:") for s in step.stderr) else 0
            steps.append(step)
        blocks.append(steps)
    return blocks


# ---- comparing a step with its rerun -------------------------------------------------------

ID_WORDS = re.compile(
    r"\b(run|runs|query|queries|score set|score sets|circuit|circuits|patch query|--run|"
    r"--scores|--queries|--runs)\s+([\d,]+)\b"
)
ID_COLUMNS = re.compile(r"(_id|^run_[ab]$|^source_[ab]$)")


def ids_in(lines: list[str]) -> list[str]:
    """The ids a text names: "run 1", "score set 3", "query 5", "--scores 3", ..."""
    return [f"{m.group(1)} {m.group(2)}" for line in lines for m in ID_WORDS.finditer(line)]


def table(lines: list[str]) -> tuple[list[str], list[dict[str, str]]] | None:
    """(columns, rows) of an aligned table (a header over a dashed rule) or of CSV output."""
    for k in range(1, len(lines)):
        if lines[k] and set(lines[k]) <= {"-", " "} and "-" in lines[k]:
            spans = [m.span() for m in re.finditer(r"-+", lines[k])]
            cut = [[line[a:b if j + 1 < len(spans) else None].strip()
                    for j, (a, b) in enumerate(spans)] for line in lines[k - 1 :]]  # fmt: skip
            cut = [row for i, row in enumerate(cut) if i != 1]
            return cut[0], [dict(zip(cut[0], row, strict=True)) for row in cut[1:]]
    if lines and "," in lines[0] and not lines[0].startswith("error"):
        rows = list(csv.reader(io.StringIO("\n".join(lines))))
        if all(len(r) == len(rows[0]) for r in rows):
            return rows[0], [dict(zip(rows[0], r, strict=True)) for r in rows[1:]]
    return None


def differences(expected: Step, actual: Step) -> list[str]:
    """What the README promises that the rerun does not do: exit status, ids, table columns,
    row counts and id columns' values."""
    problems = []
    where = f"$ {expected.command.splitlines()[0]}"
    if (expected.returncode == 0) != (actual.returncode == 0):
        problems.append(f"{where}: exit {actual.returncode}: {actual.stderr[-2:]}")
        return problems
    for stream in ("stdout", "stderr"):
        shown, got = getattr(expected, stream), getattr(actual, stream)
        if ids_in(shown) != ids_in(got):
            problems.append(f"{where}: {stream} ids {ids_in(shown)} != {ids_in(got)}")
        promised, found = table(shown), table(got)
        if promised is None:
            if len(shown) != len(got):
                problems.append(f"{where}: {stream} has {len(got)} lines, README {len(shown)}")
            continue
        if found is None or promised[0] != found[0]:
            problems.append(f"{where}: columns {found and found[0]} != {promised[0]}")
            continue
        if len(promised[1]) != len(found[1]):
            problems.append(f"{where}: {len(found[1])} rows, README shows {len(promised[1])}")
            continue
        for column in (c for c in promised[0] if ID_COLUMNS.search(c)):
            if [r[column] for r in promised[1]] != [r[column] for r in found[1]]:
                problems.append(f"{where}: column {column} differs")
    return problems
