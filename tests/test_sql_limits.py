"""What one user SQL statement may cost, and what it may return: a statement timeout, a cap on
the rows and on the memory of a result, each a one-line refusal naming the flag that raises it;
and every DuckDB type either rendered (as DuckDB's own text where the output formats cannot hold
it) or refused in one line, in every format of `sql` and `export`."""

from __future__ import annotations

import io
import json
import subprocess
import sys
import threading
import time

import polars as pl
import pytest
from cli_process import start_cli
from click.testing import CliRunner

from actstore.app.cli import main
from actstore.core import sandbox
from actstore.core.errors import ActstoreError, UsageError
from actstore.core.store import Store


def refusal(res, code: int) -> str:
    assert res.exit_code == code, (res.exit_code, res.output)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: "), res.stderr
    assert "Traceback" not in res.output
    return lines[0]


# ---- limits ----------------------------------------------------------------------------------


def test_a_runaway_statement_stops_at_the_timeout_and_frees_the_catalog(empty_store):
    """`select count(*) from range(1e13)` would run for hours holding the catalog open; it stops
    at --timeout with one line, and a writer waiting on the catalog meanwhile gets it."""
    store = Store(empty_store)
    wrote: list[float] = []

    def write() -> None:
        with store.transaction() as w:  # waits for the reader's lock (another instance's)
            w.con.execute("CREATE TABLE IF NOT EXISTS scratch (x INTEGER)")
        wrote.append(time.monotonic())

    started = time.monotonic()
    res = CliRunner().invoke(
        main, ["sql", str(empty_store), "select count(*) from range(1e13::BIGINT)",
               "--timeout", "1.5"],
    )  # fmt: skip
    took = time.monotonic() - started
    line = refusal(res, 1)
    assert "ran over 1.5 s" in line and "--timeout" in line
    assert 1.4 < took < 10, took
    writer = threading.Thread(target=write)
    writer.start()
    writer.join(30)
    assert wrote and wrote[0] - started < 15
    with pytest.raises(ActstoreError, match="ran over 0.5 s"):
        store.query("select count(*) from range(1e13::BIGINT)", timeout=0.5)


def test_the_timeout_covers_a_statement_that_holds_the_catalog_from_another_process(empty_store):
    """A writer in this process waits (up to its 120 s) for a runaway reader in another process,
    which the default limits stop long before: here --timeout 2 in a real `actstore sql`."""
    proc = start_cli(
        "sql", empty_store, "select count(*) from range(1e13::BIGINT)", "--timeout", "2"
    )
    time.sleep(1.0)
    started = time.monotonic()
    with Store(empty_store).transaction() as w:
        w.con.execute("CREATE TABLE scratch (x INTEGER)")
    assert time.monotonic() - started < 30
    out, err = proc.communicate(30)
    assert proc.returncode == 1 and err.count("\n") == 1 and "ran over 2 s" in err, err
    assert sandbox.TIMEOUT_S < 120  # under the writer's wait for readers (catalog.WRITE_WAIT_S)


# `actstore ARGS…` that writes its own peak resident memory (VmHWM, which starts afresh at exec,
# unlike ru_maxrss) to the file named first.
MEASURED = """
import atexit, sys
from actstore.app.cli import main
path = sys.argv.pop(1)
status = lambda: next(l for l in open("/proc/self/status") if l.startswith("VmHWM"))
atexit.register(lambda: open(path, "w").write(status()))
sys.argv[0] = "actstore"
main()
"""


@pytest.mark.slow
def test_a_60m_row_result_is_refused_in_bounded_memory(empty_store, tmp_path):
    """60 million rows: refused at --max-rows (default 5,000,000) after reading past it, in a
    process whose peak memory stays far below the result's size; raising --max-rows hands the
    refusal to the memory cap instead."""
    peak = tmp_path / "peak"
    res = subprocess.run(
        [sys.executable, "-c", MEASURED, str(peak), "sql", str(empty_store),
         "select i, i * 2 as j from range(60000000) t(i)", "--format", "csv"],
        capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    peak_mb = int(peak.read_text().split()[1]) / 1024
    assert res.returncode == 2 and res.stdout == "", res.stderr
    assert res.stderr.count("\n") == 1 and "over 5000000 rows" in res.stderr
    assert "--max-rows" in res.stderr
    assert peak_mb < 600, peak_mb  # ~240 MB measured; 3.2 GB when let through
    res = CliRunner().invoke(
        main, ["export", str(empty_store), "--sql", "select i from range(60000000) t(i)",
               "--max-rows", "100000000", "--max-mb", "64", "-o", "-"],
    )  # fmt: skip
    line = refusal(res, 2)
    assert "takes over 64 MB" in line and "--max-mb" in line


def test_the_caps_let_through_what_fits_and_refuse_what_does_not(empty_store, tmp_path):
    store = Store(empty_store)
    assert store.query("select * from range(1000)", max_rows=1000).height == 1000
    with pytest.raises(UsageError, match="over 999 rows"):
        store.query("select * from range(1000)", max_rows=999)
    target = tmp_path / "x.parquet"
    res = CliRunner().invoke(
        main, ["export", str(empty_store), "--sql", "select * from range(10)", "--max-rows", "5",
               "--format", "parquet", "-o", str(target)],
    )  # fmt: skip
    assert "over 5 rows" in refusal(res, 2) and not target.exists()
    with pytest.raises(ActstoreError, match="more than 16 MB of memory.*--max-mb"):
        store.query("select list(i) from range(100000000) t(i)", max_mb=16)


@pytest.mark.parametrize(
    ("flag", "value", "message"),
    [
        ("--timeout", "0", "--timeout must be a positive number of seconds"),
        ("--timeout", "nan", "--timeout must be a positive number of seconds"),
        ("--timeout", "-1", "--timeout must be a positive number of seconds"),
        ("--timeout", "1e300", "--timeout must be at most 604800 seconds"),
        ("--max-rows", "0", "--max-rows must be a positive number of rows"),
        ("--max-mb", "8", "--max-mb must be at least 16"),
        ("--max-mb", "-5", "--max-mb must be a positive number of megabytes"),
    ],
)
@pytest.mark.parametrize("command", ["sql", "export"])
def test_bad_limits_are_refused_in_one_line(empty_store, command, flag, value, message):
    args = [command, str(empty_store)] + (
        ["select 1"] if command == "sql" else ["--sql", "select 1"]
    )
    res = CliRunner().invoke(main, [*args, flag, value])
    assert message in refusal(res, 2)


# ---- odd types -------------------------------------------------------------------------------

# (SQL, what every text format shows for it): DuckDB's own text where polars and the formats
# cannot hold the type as it is.
ODD = {
    "interval": (
        "interval 1 month + interval 2 day + interval 3 second",
        "1 month 2 days 00:00:03",
    ),
    "blob": ("'\\xAA\\x00abc'::BLOB", "\\xAA\\x00abc"),
    "bit": ("'0101'::BIT", "0101"),
    "varint": ("'1267650600228229401496703205376'::VARINT", "1267650600228229401496703205376"),
    "union": ("union_value(num := 2)::UNION(num INT, str VARCHAR)", "2"),
    "timetz": ("'12:00:00+02'::TIMETZ", "12:00:00+02"),
    "list of bits": ("['01'::BIT, '1'::BIT]", "[01, 1]"),
    "map": ("MAP {'a': 1}", "{a=1}"),
    "timestamp infinity": ("'infinity'::TIMESTAMP", "infinity"),
    "timestamp -infinity": ("'-infinity'::TIMESTAMP", "-infinity"),
    "timestamptz infinity": ("'infinity'::TIMESTAMPTZ", "infinity"),
    "timestamp_s infinity": ("'infinity'::TIMESTAMP_S", "infinity"),
    "timestamp_ms -infinity": ("'-infinity'::TIMESTAMP_MS", "-infinity"),
    "timestamp_ns infinity": ("'infinity'::TIMESTAMP_NS", "infinity"),
    "date infinity": ("'infinity'::DATE", "infinity"),
}


def _value(fmt: str, text: str, n: int = 0) -> str:
    """Row `n`'s value of column v in a command's output."""
    if fmt == "table":
        return text.splitlines()[2 + n].strip()
    if fmt == "csv":
        return pl.read_csv(io.StringIO(text), infer_schema=False)["v"][n]
    if fmt == "json":
        return json.loads(text)[n]["v"]
    return json.loads(text.splitlines()[n])["v"]


@pytest.mark.parametrize("kind", list(ODD))
def test_odd_types_render_in_every_format(empty_store, tmp_path, kind):
    expr, shown = ODD[kind]
    query = f"select {expr} as v"
    for fmt in ["table", "csv", "json", "jsonl"]:
        res = CliRunner().invoke(main, ["sql", str(empty_store), query, "--format", fmt])
        assert res.exit_code == 0, (kind, fmt, res.output)
        assert _value(fmt, res.stdout) == shown, (kind, fmt, res.stdout)
    for fmt in ["csv", "json", "jsonl", "parquet"]:
        target = tmp_path / f"x.{fmt}"
        res = CliRunner().invoke(
            main, ["export", str(empty_store), "--sql", query, "--format", fmt, "-o", str(target)]
        )
        assert res.exit_code == 0, (kind, fmt, res.output)
        if fmt == "parquet":
            assert pl.read_parquet(target)["v"].cast(pl.String)[0] == shown, kind
        else:
            assert _value(fmt, target.read_text()) == shown, (kind, fmt)


def test_infinite_timestamps_keep_the_finite_ones_beside_them(empty_store):
    df = Store(empty_store).query(
        "select * from (values ('infinity'::TIMESTAMP), ('2020-01-02 03:04:05'::TIMESTAMP), "
        "('-infinity'::TIMESTAMP), (NULL)) t(v)"
    )
    assert df["v"].to_list() == ["infinity", "2020-01-02 03:04:05.000000", "-infinity", None]
    finite = Store(empty_store).query("select '2020-01-02'::TIMESTAMP as v, '2020-01-02'::DATE d")
    assert finite.schema == {"v": pl.Datetime("us"), "d": pl.Date}


def test_128_bit_integers_are_exact_or_refused(empty_store):
    """sum() of BIGINT is a HUGEINT: exact as a 38-digit decimal, and a 39-digit value (which the
    conversion would round) refused in one line naming the cast, never shown rounded."""
    store = Store(empty_store)
    big = "99999999999999999999999999999999999999"
    df = store.query(f"select {big}::HUGEINT as v, sum(i) as s from range(10) t(i)")
    assert str(df["v"].item()) == big and int(df["s"].item()) == 45
    res = CliRunner().invoke(
        main, ["sql", str(empty_store), "select 170141183460469231731687303715884105727::HUGEINT"]
    )
    line = refusal(res, 2)
    assert "Could not cast value 170141183460469231731687303715884105727" in line
    assert "::VARCHAR" in line
    shown = store.query("select 170141183460469231731687303715884105727::HUGEINT::VARCHAR v")
    assert shown["v"].item() == "170141183460469231731687303715884105727"


def test_plain_types_keep_their_types(empty_store):
    """Only what the formats cannot hold becomes text: numbers, strings, lists and structs of
    them come back typed as before."""
    df = Store(empty_store).query(
        "select 1::INTEGER a, 2.5::DOUBLE b, 'x' c, [1, 2] d, {'k': 1} e, 1.50::DECIMAL(9,2) f, "
        "sum(1::BIGINT) g, 1 a"
    )
    assert df.columns == ["a", "b", "c", "d", "e", "f", "g", "a_1"]
    assert df.dtypes[:5] == [pl.Int32, pl.Float64, pl.String, pl.List(pl.Int32),
                             pl.Struct({"k": pl.Int32})]  # fmt: skip
    assert df.row(0)[:5] == (1, 2.5, "x", [1, 2], {"k": 1})
