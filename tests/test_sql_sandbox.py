"""User SQL cannot leave the catalog: escape attempts through `sql` and `export --sql` are refused
by DuckDB's sandbox, write no file, read no file, and leave a store that verifies."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

import pytest
from cli_process import start_cli
from click.testing import CliRunner
from test_cli import snapshot

from actstore.app.cli import main

SECRET = "TOPSECRET-4f1c"

# Each is one way out of a read-only SELECT: {out} is a directory outside the store, {secret} a
# file outside it, {store} the store itself.
ESCAPES = [
    "EXPLAIN ANALYZE COPY runs TO '{out}/runs.csv'",
    "EXPLAIN ANALYZE COPY (SELECT 'garbage') TO '{store}/catalog.duckdb' (FORMAT csv)",
    "EXPLAIN ANALYZE COPY (SELECT '#!/bin/sh') TO '{out}/evil.sh' (FORMAT csv, HEADER false)",
    "COPY runs TO '{out}/plain.csv'",
    "SELECT * FROM read_text('{secret}')",
    "SELECT * FROM read_csv('{secret}')",
    "SELECT * FROM read_blob('{secret}')",
    "SELECT * FROM '{secret}'",
    "SELECT * FROM glob('{out}/*')",
    "SELECT * FROM sniff_csv('{secret}')",
    "SELECT * FROM query('SELECT * FROM read_text(''{secret}'')')",
    "WITH t AS (SELECT * FROM read_text('{secret}')) SELECT * FROM t",
    "ATTACH '{out}/other.duckdb' AS other",
    "INSTALL httpfs",
    "LOAD httpfs",
    "SET enable_external_access = true",
    "SET lock_configuration = false",
    "RESET enable_external_access",
    "SET profiling_output = '{out}/profile.json'",
    "PRAGMA enable_profiling",
    "SELECT 1; COPY runs TO '{out}/second.csv'",
    "EXPORT DATABASE '{out}/dump'",
    "EXPLAIN ANALYZE CREATE TABLE evil AS SELECT 1",
    "EXPLAIN ANALYZE DELETE FROM runs",
    "EXPLAIN ANALYZE INSERT INTO runs (run_id) VALUES (99)",
    "CREATE SECRET evil (TYPE s3, KEY_ID 'a', SECRET 'b')",
]


@pytest.fixture
def places(ioi_copy, tmp_path):
    store = ioi_copy
    out = tmp_path / "outside"
    out.mkdir()
    (out / "existing.csv").write_text("a\n1\n")
    secret = tmp_path / "secret.csv"
    secret.write_text(f"key\n{SECRET}\n")
    return {"store": store, "out": out, "secret": secret}


@pytest.mark.parametrize("how", ["sql", "export"])
def test_escapes_are_refused_and_touch_no_file(places, tmp_path, how):
    store, out = places["store"], places["out"]
    before, outside = snapshot(store), snapshot(out)
    for escape in ESCAPES:
        text = escape.format(**places)
        if how == "sql":
            args = ["sql", str(store), text]
        else:
            args = ["export", str(store), "--sql", text, "-o", str(tmp_path / "x.csv")]
        res = CliRunner().invoke(main, args)
        assert res.exit_code == 2, (escape, res.exit_code, res.output)
        lines = res.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("error: "), (escape, res.stderr)
        assert SECRET not in res.output, escape
        assert snapshot(out) == outside, f"{escape} wrote outside the store"
        assert snapshot(store) == before, f"{escape} changed the store"
    assert not (tmp_path / "x.csv").exists()
    res = CliRunner().invoke(main, ["verify", str(store)])
    assert res.exit_code == 0 and "no damage" in res.stderr, res.output


def test_the_sandbox_still_answers_reads_and_exports_write_from_python(places, tmp_path):
    store = places["store"]
    res = CliRunner().invoke(
        main, ["sql", str(store), "select count(*) as n from prompts", "--format", "csv"]
    )
    assert res.exit_code == 0 and res.stdout.split() == ["n", "20"], res.output
    target = tmp_path / "top.csv"
    res = CliRunner().invoke(main, ["export", str(store), "--sql",
                                    "select prompt_idx from prompts order by 1 limit 3",
                                    "-o", str(target)])  # fmt: skip
    assert res.exit_code == 0 and target.read_text().split() == ["prompt_idx", "0", "1", "2"]


# ---- the temporary directory: DuckDB lets a sandboxed connection use its own ------------------


def _one_line_refusal(res, code: int = 2) -> str:
    lines = res.stderr.strip().splitlines()
    assert res.exit_code == code, (res.exit_code, res.output)
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    return lines[0]


@pytest.mark.parametrize("leftover", [False, True], ids=["absent", "left-behind"])
@pytest.mark.parametrize("how", ["sql", "export"])
def test_the_catalogs_own_temp_directory_is_out_of_reach(empty_store, tmp_path, how, leftover):
    """`STORE/catalog.duckdb.tmp/` is DuckDB's default temporary directory: absent, or left
    behind by a killed statement with a file in it, no statement writes, reads or lists it, and
    the refusal never calls the catalog damaged."""
    tmp = empty_store / "catalog.duckdb.tmp"
    if leftover:
        tmp.mkdir()
        (tmp / "spill.tmp").write_text(SECRET)
    before = snapshot(empty_store)
    attempts = [
        f"EXPLAIN ANALYZE COPY (select 1) TO '{tmp}/evil.sh'",
        f"EXPLAIN ANALYZE COPY (select '#!/bin/sh') TO '{tmp}/evil.sh' (FORMAT csv, HEADER false)",
        f"SELECT * FROM read_text('{tmp}/spill.tmp')",
        f"SELECT * FROM read_blob('{tmp}/spill.tmp')",
        f"SELECT * FROM glob('{tmp}/*')",
        f"SELECT * FROM glob('{empty_store}/*')",
    ]
    for text in attempts:
        args = ["sql", str(empty_store), text]
        if how == "export":
            args = ["export", str(empty_store), "--sql", text, "-o", str(tmp_path / "x.csv")]
        res = CliRunner().invoke(main, args)
        line = _one_line_refusal(res)
        assert "damaged" not in line and SECRET not in res.output, (text, line)
        assert snapshot(empty_store) == before, f"{text} changed the store"
        assert tmp.exists() == leftover
    assert not (tmp_path / "x.csv").exists()


def test_the_sandbox_has_a_private_temp_directory_outside_the_store(empty_store):
    """Each sandboxed connection spills into a fresh 0700 directory outside the store, removed
    when it closes; a later statement cannot reach the one an earlier statement had."""
    import stat

    from actstore.core.errors import UsageError
    from actstore.core.store import Store

    store = Store(empty_store)
    with store.catalog.sandbox(memory_mb=64) as con:
        scratch = Path(con.execute("SELECT current_setting('temp_directory')").fetchall()[0][0])
        assert scratch.is_dir() and stat.S_IMODE(scratch.stat().st_mode) == 0o700
        assert empty_store.resolve() not in [scratch.resolve(), *scratch.resolve().parents]
        assert len(list(scratch.iterdir())) == 0
    assert not scratch.exists()
    named = store.sql("SELECT current_setting('temp_directory') AS t")["t"].item()
    assert named != str(scratch) and not Path(named).exists()
    for text in [f"SELECT * FROM glob('{named}/*')", f"SELECT * FROM read_text('{named}/x')"]:
        with pytest.raises(UsageError, match="reads only the catalog"):
            store.sql(text)
    # Not even a statement's own (private) directory is read by name; the refusal is the
    # statement's, never damage of the catalog.
    with pytest.raises(UsageError, match="not files: read_csv\\(\\) is refused") as refused:
        store.sql("SELECT * FROM read_csv(current_setting('temp_directory') || '/nope.csv')")
    assert "damaged" not in str(refused.value)


# What DuckDB's sandbox still lets a connection read: its own database file and WAL.
NOT_FILES = "reads only the catalog's tables and views, not files"
CATALOG_READS = [
    "SELECT size FROM read_blob('{catalog}')",
    "SELECT * FROM read_text('{catalog}')",
    "SELECT * FROM read_csv('{catalog}')",
    "SELECT * FROM read_duckdb('{catalog}')",
    "SELECT * FROM '{catalog}'",
    "SELECT size FROM read_blob('{catalog}.wal')",
    "SELECT * FROM runs WHERE run_id IN (SELECT size FROM read_blob('{catalog}'))",
    "WITH b AS (SELECT content FROM read_blob('{catalog}')) SELECT length(content) FROM b",
    "SELECT (SELECT size FROM read_blob('{catalog}')) AS s",
    "SELECT * FROM query('SELECT size FROM read_blob(''{catalog}'')')",
    "EXPLAIN ANALYZE SELECT size FROM read_blob('{catalog}')",
]


@pytest.mark.parametrize("how", ["sql", "export", "query"])
def test_the_catalog_file_is_read_only_through_its_tables(ioi_copy, tmp_path, how):
    """The catalog file and its WAL are the paths DuckDB's sandbox must leave open: reading
    their bytes by name (read_blob, read_text, any file reader, a path as a table, nested or
    through query()) is refused in one line before the statement runs; the tables, views and
    DuckDB's own listings still answer."""
    import actstore
    from actstore.core.errors import UsageError

    catalog = ioi_copy / "catalog.duckdb"
    before = snapshot(ioi_copy)
    for template in CATALOG_READS:
        text = template.format(catalog=catalog)
        if how == "query":
            with pytest.raises(UsageError, match=NOT_FILES + ": .* is refused; SHOW TABLES"):
                actstore.open(str(ioi_copy)).query(text)
            continue
        args = ["sql", str(ioi_copy), text]
        if how == "export":
            args = ["export", str(ioi_copy), "--sql", text, "-o", str(tmp_path / "x.csv")]
        line = _one_line_refusal(CliRunner().invoke(main, args))
        assert NOT_FILES in line, (text, line)
    assert snapshot(ioi_copy) == before and not (tmp_path / "x.csv").exists()
    store = actstore.open(str(ioi_copy))
    assert store.query("SELECT count(*) AS n FROM prompts")["n"].item() == 20
    assert "query_params" in store.query("SHOW TABLES")["name"].to_list()
    assert store.query("DESCRIBE runs").height > 5
    assert store.query("SELECT sum(range) AS s FROM range(4)")["s"].item() == 6
    assert store.query("SELECT count(*) AS n FROM duckdb_tables()")["n"].item() > 5


def test_a_temp_directory_inside_the_store_is_refused(empty_store, monkeypatch):
    """TMPDIR pointing into the store would put the sandbox's directory there: refused, and
    nothing is left behind in the store."""
    import tempfile

    from actstore.core.errors import ActstoreError
    from actstore.core.store import Store

    before = snapshot(empty_store)
    monkeypatch.setattr(tempfile, "tempdir", str(empty_store))
    with pytest.raises(ActstoreError, match="inside the store .*point TMPDIR outside it"):
        Store(empty_store).sql("SELECT 1")
    assert snapshot(empty_store) == before and not list(empty_store.glob("actstore-sql-*"))


def _spilling(store: Path, tmpdir: Path) -> subprocess.Popen:
    """`actstore sql` running a GROUP BY too large for 32 MB, so DuckDB spills to disk."""
    big = ("select count(*) from (select md5(i::varchar) m, count(*) from range(30000000) t(i) "
           "group by m)")  # fmt: skip
    return start_cli("sql", store, big, "--max-mb", "32", env={"TMPDIR": str(tmpdir)})


@pytest.mark.slow
def test_another_statements_spill_files_are_out_of_reach_while_it_runs_and_after_a_kill(
    empty_store, tmp_path
):
    """While one `actstore sql` spills to disk, a second cannot list or read its spill files;
    killed with SIGKILL, it leaves them outside the store, still out of reach, and the store as
    it was."""
    from actstore.core.errors import UsageError
    from actstore.core.store import Store

    before = snapshot(empty_store)
    spills = tmp_path / "spills"
    spills.mkdir()
    proc = _spilling(empty_store, spills)
    try:
        deadline = time.monotonic() + 60
        while not (files := [p for p in spills.rglob("*") if p.is_file()]):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "the statement never spilled"
            time.sleep(0.2)
        scratch = files[0].parent
        assert scratch.parent == spills and scratch.name.startswith("actstore-sql-")
        store = Store(empty_store)
        for text in [f"SELECT * FROM glob('{scratch}/*')",
                     f"SELECT size FROM read_blob('{files[0]}')",
                     f"EXPLAIN ANALYZE COPY (SELECT 1) TO '{scratch}/evil.sh'"]:  # fmt: skip
            with pytest.raises(UsageError):
                store.sql(text)
            args = ["export", str(empty_store), "--sql", text, "-o", str(tmp_path / "x.csv")]
            assert _one_line_refusal(CliRunner().invoke(main, args)).startswith("error: ")
        assert not (tmp_path / "x.csv").exists() and not (scratch / "evil.sh").exists()
    finally:
        proc.kill()
        proc.wait(30)
    assert proc.returncode == -signal.SIGKILL
    assert any(p.is_file() for p in scratch.rglob("*")), "the kill left nothing behind"
    with pytest.raises(UsageError, match="reads only the catalog"):
        Store(empty_store).sql(f"SELECT * FROM glob('{scratch}/*')")
    assert snapshot(empty_store) == before and not (empty_store / "catalog.duckdb.tmp").exists()


# ---- every public SQL entry point goes through the sandbox -----------------------------------


def test_store_query_is_sandboxed(empty_store, tmp_path):
    """`Store.query` (the Python API) runs user SQL in the sandbox like `actstore sql`; actstore's
    own SQL goes through the private `_trusted_query`."""
    import actstore
    from actstore.core.errors import UsageError

    store = actstore.open(str(empty_store))
    out = tmp_path / "elsewhere"
    out.mkdir()
    before = snapshot(empty_store)
    for text in [f"COPY runs TO '{out}/x.csv'",
                 f"EXPLAIN ANALYZE COPY runs TO '{out}/x.csv'",
                 "EXPLAIN ANALYZE DELETE FROM runs",
                 f"ATTACH '{out}/o.duckdb' AS o"]:  # fmt: skip
        with pytest.raises(UsageError):
            store.query(text)
    assert list(out.iterdir()) == [] and snapshot(empty_store) == before
    assert store.query("SELECT ? + 1 AS x", [41])["x"].item() == 42
    assert store._trusted_query("SELECT count(*) AS n FROM runs")["n"].item() == 0
