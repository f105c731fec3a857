"""User SQL cannot leave the catalog: escape attempts through `sql` and `export --sql` are refused
by DuckDB's sandbox, write no file, read no file, and leave a store that verifies."""

from __future__ import annotations

import pytest
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
