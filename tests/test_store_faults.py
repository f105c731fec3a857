"""No tracebacks on a damaged or unwritable store: one line, exit 1, naming the problem and the fix,
and writing commands fail before they compute, not after."""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
from pathlib import Path

import pytest
from click.testing import CliRunner
from test_cli import run_cli, snapshot
from test_writer import held_store  # noqa: F401  (a fixture: another process holds the lock)

from actstore.app.cli import main

ROOT = Path(__file__).resolve().parent.parent
PR_CAPBSET_DROP = 24
INGEST = ["--model", "toy-random", "--task", "ioi", "--n", "4", "--hooks", "z"]
PATCH = ["--run", "1", "--component", "head"]


def assert_one_line(res: subprocess.CompletedProcess, message: str) -> None:
    assert res.returncode == 1, (res.returncode, res.stderr)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], res.stderr
    assert "Traceback" not in res.stderr


@pytest.fixture
def store(ioi_copy):
    return ioi_copy


@pytest.mark.cover(1)
@pytest.mark.parametrize("command", ["info", "verify", "ingest"])
@pytest.mark.parametrize("keep", [0.5, 0.01])
def test_a_truncated_catalog_is_one_line(store, command, keep):
    catalog = store / "catalog.duckdb"
    os.truncate(catalog, int(catalog.stat().st_size * keep))
    before = snapshot(store)
    res = run_cli(command, str(store), *(INGEST if command == "ingest" else []))
    assert_one_line(res, "is damaged and cannot be read")
    assert "restore catalog.duckdb from a copy or backup" in res.stderr
    assert snapshot(store) == before


def test_verify_and_patch_on_a_store_whose_creation_stopped_before_its_arrays(
    tmp_path, session_ingest
):
    """Killed between creating the catalog and the arrays: nothing to verify, no run to patch."""
    from actstore.core.catalog import Catalog

    path = tmp_path / "s"
    path.mkdir()
    catalog = Catalog(path / "catalog.duckdb")
    catalog.writing = True
    catalog.migrate()
    res = CliRunner().invoke(main, ["verify", str(path)])
    assert res.exit_code == 0 and "0 chunks verified, no damage" in res.stderr, res.output
    res = CliRunner().invoke(main, ["patch", str(path), *PATCH])
    assert res.exit_code == 2 and len(res.stderr.strip().splitlines()) == 1, res.output
    assert "run 1 is not in" in res.stderr
    res = CliRunner().invoke(main, ["ingest", str(path), *INGEST])  # the next ingest completes it
    assert res.exit_code == 0 and res.stdout.strip() == "1", res.output
    assert (path / "arrays.zarr" / "zarr.json").exists()


@pytest.mark.slow
def test_an_uncached_query_during_an_ingest_fails_at_once(held_store):  # noqa: F811
    path, pid = held_store
    before = snapshot(path)
    res = run_cli("patch", str(path), *PATCH)
    assert_one_line(res, f"is being written by pid {pid}")
    assert snapshot(path) == before


def drop_root_override() -> None:
    """Make root subject to file permissions in this (child) process, as every other user is:
    drop the capabilities that let it write read-only files (CAP_DAC_OVERRIDE, _READ_SEARCH,
    CAP_FOWNER) from the bounding set before exec."""
    if os.geteuid() != 0:
        return
    libc = ctypes.CDLL(None, use_errno=True)
    for cap in (1, 2, 3):
        if libc.prctl(PR_CAPBSET_DROP, cap, 0, 0, 0) != 0:
            raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP) failed")


def run_unprivileged(*args: str) -> subprocess.CompletedProcess:
    return run_cli(*args, preexec_fn=drop_root_override)


@pytest.fixture(scope="module")
def read_only(ioi_store, tmp_path_factory, toy_random):
    """The store with a cached query (what `actstore patch STORE` PATCH records), then made
    read-only (files 444, directories 555)."""
    import actstore

    store = tmp_path_factory.mktemp("read-only") / "store"
    shutil.copytree(ioi_store, store)
    actstore.open(store).patch(1, "head", model=toy_random)
    for p in [store, *store.rglob("*")]:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    yield store
    for p in [store, *store.rglob("*")]:
        os.chmod(p, 0o755 if p.is_dir() else 0o644)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [["patch", "{s}", *PATCH, "--metric", "kl"], ["ingest", "{s}", *INGEST],
     ["verify", "{s}", "--repair"]],
)  # fmt: skip
def test_a_read_only_store_refuses_writers_before_they_compute(read_only, args):
    before = snapshot(read_only)
    res = run_unprivileged(*[a.format(s=read_only) for a in args])
    assert_one_line(res, f"store {read_only} is not writable (Permission denied)")
    assert "work on a writable copy" in res.stderr
    assert snapshot(read_only) == before


@pytest.mark.slow
def test_a_read_only_store_still_answers_reads_and_cached_queries(read_only):
    for args in (["info", str(read_only)], ["sql", str(read_only), "select 1"],
                 ["patch", str(read_only), *PATCH], ["verify", str(read_only)]):  # fmt: skip
        res = run_unprivileged(*args)
        assert res.returncode == 0, (args, res.stderr)


@pytest.mark.slow
def test_an_older_store_on_a_read_only_mount_answers_info_and_sql(tmp_path):
    """No migration on open: `info` and `sql` read a version-1 catalog that no one may write."""
    from handbuilt import version_one_store

    store = version_one_store(tmp_path / "old")
    before = snapshot(store)
    for p in [store, *store.rglob("*")]:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    try:
        info = run_unprivileged("info", str(store), "--format", "csv")
        sql = run_unprivileged("sql", str(store), "select count(*) AS n from prompts", "--format",
                               "csv")  # fmt: skip
    finally:
        for p in [store, *store.rglob("*")]:
            os.chmod(p, 0o755 if p.is_dir() else 0o644)
    assert info.returncode == 0 and info.stdout.splitlines()[1].startswith("1,toy,ioi"), info
    assert sql.returncode == 0 and sql.stdout.split() == ["n", "2"], sql
    assert snapshot(store) == before
