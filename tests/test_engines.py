"""The engines behind --workers/--scheduler and --arrays-url are checked before any work: a
missing or broken dask.distributed or s3fs gives one line naming the versions and the fix, exit
1, and leaves the store exactly as it was.

The broken installs are real packages put first on PYTHONPATH, as pip leaves them: distributed
2021.4.1's own metadata beside a module that fails on import the way it does against a new dask,
or a distributed whose metadata pins a dask that is not the one installed."""

from __future__ import annotations

import subprocess
from importlib import metadata
from pathlib import Path

import pytest
from cli_process import run_cli

pytestmark = pytest.mark.slow  # each case starts the CLI in a subprocess

IMPORT_ERROR = "cannot import name 'collections_to_dsk' from 'dask.base'"


def shadow(root: Path, name: str, version: str, requires: list[str], body: str) -> Path:
    """A distribution `name` at `version` under `root`, as pip installs one."""
    info = root / f"{name}-{version}.dist-info"
    info.mkdir(parents=True)
    lines = ["Metadata-Version: 2.1", f"Name: {name}", f"Version: {version}"]
    lines += [f"Requires-Dist: {req}" for req in requires]
    (info / "METADATA").write_text("\n".join(lines) + "\n")
    (root / name).mkdir()
    (root / name / "__init__.py").write_text(body)
    return root


def run_shadowed(path_first: Path, *args: str) -> subprocess.CompletedProcess:
    """The CLI with `path_first` (shadowing installs) first on the path."""
    return run_cli(*args, env={"PYTHONPATH": str(path_first)})


def snapshot(path: Path) -> dict[str, bytes]:
    return {
        str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()
    }


@pytest.fixture
def old_distributed(tmp_path) -> Path:
    """distributed 2021.4.1 (`dask>=2021.04.1`, met by any newer dask) that fails on import."""
    return shadow(tmp_path / "site", "distributed", "2021.4.1", ["dask>=2021.04.1"],
                  f"raise ImportError({IMPORT_ERROR!r})\n")  # fmt: skip


@pytest.fixture
def mismatched_distributed(tmp_path) -> Path:
    """A distributed that imports but whose metadata pins another dask than the installed one."""
    return shadow(tmp_path / "site", "distributed", "2026.8.0", ["dask==2021.4.1"], "")


@pytest.mark.parametrize(
    "command",
    [
        ["ingest", "{store}", "--model", "toy-random", "--task", "ioi", "--n", "8",
         "--workers", "2"],
        ["ingest", "{store}", "--model", "toy-random", "--task", "ioi", "--n", "8",
         "--scheduler", "tcp://127.0.0.1:1"],
        ["patch", "{store}", "--run", "1", "--component", "head", "--workers", "2"],
        ["attribute", "{store}", "--run", "1", "--method", "eap", "--workers", "2"],
        ["reduce", "{store}", "--run", "1", "--hook", "blocks.0.hook_resid_pre",
         "--scheduler", "tcp://127.0.0.1:1"],
        ["path", "{store}", "--run", "1", "--senders", "all", "--receivers", "logits",
         "--workers", "2"],
    ],
    ids=["ingest-workers", "ingest-scheduler", "patch", "attribute", "reduce", "path"],
)  # fmt: skip
def test_broken_distributed_is_one_line_and_the_store_is_unchanged(
    ioi_copy, old_distributed, command
):
    before = snapshot(ioi_copy)
    res = run_shadowed(old_distributed, *[arg.format(store=ioi_copy) for arg in command])
    assert res.returncode == 1, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    dask = metadata.version("dask")
    assert f"dask {dask}, distributed 2021.4.1" in res.stderr
    assert IMPORT_ERROR in res.stderr and "requirements.lock" in res.stderr
    assert snapshot(ioi_copy) == before


def test_conflicting_metadata_names_the_requirement(ioi_copy, mismatched_distributed):
    before = snapshot(ioi_copy)
    res = run_shadowed(mismatched_distributed, "patch", str(ioi_copy), "--run", "1", "--component",
                       "head", "--workers", "2")  # fmt: skip
    assert res.returncode == 1, res.stderr
    dask = metadata.version("dask")
    assert f"distributed 2026.8.0 requires dask==2021.4.1, dask {dask} is installed" in res.stderr
    assert res.stderr.count("\n") == 1
    assert snapshot(ioi_copy) == before


def test_missing_s3fs_is_one_line_before_a_store_is_made(tmp_path):
    site = tmp_path / "site"
    site.mkdir()
    (site / "s3fs.py").write_text("raise ModuleNotFoundError(\"No module named 's3fs'\")\n")
    store = tmp_path / "new"
    res = run_shadowed(site, "ingest", str(store), "--model", "toy-random", "--task", "ioi",
                       "--n", "8", "--arrays-url", "s3://bucket/acts")  # fmt: skip
    assert res.returncode == 1, res.stderr
    assert res.stderr.count("\n") == 1 and "Traceback" not in res.stderr
    assert "needs s3fs" in res.stderr and "requirements.lock" in res.stderr
    assert not store.exists()
