"""The environment is the locked one: every installed distribution pinned by requirements.lock at
its locked version, and no conflict among them (a fresh machine then gets what CI tested)."""

from __future__ import annotations

import subprocess
import sys
from importlib import metadata
from pathlib import Path

import pytest
from packaging.utils import canonicalize_name

ROOT = Path(__file__).resolve().parents[1]
LOCK = ROOT / "requirements.lock"
SEEDED = {"pip", "setuptools", "wheel", "distribute"}  # the venv's own tools; pip freeze omits them


def locked() -> dict[str, str]:
    pins = {}
    for line in LOCK.read_text().splitlines():
        line = line.split("#")[0].strip()
        if line:
            name, version = line.split("==")
            pins[canonicalize_name(name)] = version
    return pins


def installed() -> dict[str, str]:
    return {
        canonicalize_name(dist.metadata["Name"]): dist.version
        for dist in metadata.distributions()
        if canonicalize_name(dist.metadata["Name"]) not in SEEDED | {"actstore"}
    }


@pytest.fixture
def project_venv() -> None:
    if Path(sys.prefix).resolve() != (ROOT / ".venv").resolve():
        pytest.skip(f"runs in the project's .venv (make setup), not {sys.prefix}")


def test_every_lock_line_is_an_exact_pin():
    assert len(locked()) > 100
    assert locked()["torch"].startswith("2.13.0")
    assert (
        locked()["dask"] == locked()["distributed"]
    )  # they release, and pin each other, in lockstep


def test_every_installed_distribution_is_locked_at_its_version(project_venv):
    pins = locked()
    unlocked = sorted(f"{name} {v}" for name, v in installed().items() if name not in pins)
    moved = sorted(
        f"{name} {v} (lock: {pins[name]})"
        for name, v in installed().items()
        if name in pins and pins[name] != v
    )
    assert not unlocked, f"installed but not in requirements.lock (make lock): {unlocked}"
    assert not moved, f"installed at another version than the lock pins: {moved}"


def test_every_locked_distribution_is_installed(project_venv):
    missing = sorted(set(locked()) - set(installed()))
    assert not missing, f"in requirements.lock but not installed (make setup): {missing}"


def test_pip_check_finds_no_conflict(project_venv):
    out = subprocess.run(
        [sys.executable, "-m", "pip", "check", "--disable-pip-version-check"],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stdout + out.stderr
