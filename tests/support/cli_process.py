"""The command line in a fresh interpreter, as a user runs it: offline (no hub), with this
repository importable, the results on stdout and one-line errors on stderr; and the bytes of
a store before and after, to check that a refused command left it as it was."""

from __future__ import annotations

import os
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
OFFLINE = {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}


def cli_command(*args: Any, python_args: Sequence[str] = ()) -> list[str]:
    return [sys.executable, *python_args, "-m", "actstore.app.cli", *map(str, args)]


def cli_env(env: dict[str, str] | None = None) -> dict[str, str]:
    """The environment of a CLI process; `env` overrides (PYTHONPATH included)."""
    return {**os.environ, **OFFLINE, "PYTHONPATH": str(ROOT), **(env or {})}


def run_cli(
    *args: Any,
    env: dict[str, str] | None = None,
    python_args: Sequence[str] = (),
    timeout: float = 600,
    **options: Any,
) -> subprocess.CompletedProcess:
    """`actstore ARGS` to its end; `options` go to subprocess.run (preexec_fn, cwd)."""
    return subprocess.run(cli_command(*args, python_args=python_args), env=cli_env(env),
                          capture_output=True, text=True, timeout=timeout, **options)  # fmt: skip


def start_cli(*args: Any, env: dict[str, str] | None = None) -> subprocess.Popen:
    """`actstore ARGS` started, for commands that run side by side."""
    return subprocess.Popen(cli_command(*args), env=cli_env(env), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)  # fmt: skip


def snapshot(path: Path) -> dict[str, bytes]:
    """Every file of a store but its writer lock, by relative path."""
    return {
        str(p.relative_to(path)): p.read_bytes()
        for p in sorted(path.rglob("*"))
        if p.is_file() and p.name != "writer.lock"
    }
