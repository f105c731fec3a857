"""User SQL: one read-only statement against the catalog, inside DuckDB's sandbox, under limits.

Every public way to run SQL text (`Store.query`, `Store.sql`, `actstore sql`, `actstore
export`) comes here. What keeps the store and other files safe is DuckDB's own sandbox
(`Catalog.sandbox`: read-only, external access off, configuration locked, a private temporary
directory); this module bounds what one statement may cost (a timeout, a row and memory cap)
and turns what DuckDB returns into a polars frame every output format can write.
"""

from __future__ import annotations

import json
import math
import re
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import duckdb
import polars as pl

from actstore.core import choices
from actstore.core.errors import ActstoreError, UsageError, first_line

READ_ONLY_STATEMENTS = {"SELECT", "EXPLAIN"}
# Defaults of `--timeout`, `--max-rows` and `--max-mb` (documented in docs/reliability.md).
TIMEOUT_S, MAX_ROWS, MAX_MB = choices.SQL_TIMEOUT_S, choices.SQL_MAX_ROWS, choices.SQL_MAX_MB
LONGEST_TIMEOUT_S = 7 * 24 * 3600  # a timer beyond the platform's time_t fails in its thread
BATCH_ROWS = 1 << 17

# DuckDB types that polars holds and every output format writes as they are. The rest (INTERVAL,
# BLOB, BIT, BIGNUM, UNION, MAP, TIME WITH TIME ZONE, GEOMETRY, VARIANT, …) come out as DuckDB's
# own text for them; nested types keep their shape only when all they hold is plain.
PLAIN = {
    "boolean", "tinyint", "smallint", "integer", "bigint", "utinyint", "usmallint", "uinteger",
    "ubigint", "float", "double", "decimal", "varchar", "uuid", "enum",
}  # fmt: skip
# 128-bit integers (what sum() of BIGINT gives) reach polars as DECIMAL(38,0), which silently
# rounds a 39-digit value: cast so that one is refused in one line instead.
HUGE = {"hugeint", "uhugeint"}
TOO_HUGE = "to DECIMAL(38,0)"
# Dates and timestamps stay typed; their infinities, which polars cannot hold, become text.
TEMPORAL = {"date", "time", "timestamp", "timestamp_ms", "timestamp_ns", "timestamp with time zone"}
NESTED = {"list", "array", "struct"}
INFINITE = {pl.Date: 2**31 - 1, pl.Datetime: 2**63 - 1}  # DuckDB's ±infinity, as stored by Arrow
# Table functions that read files by name, besides every `read_*`, `parquet_*`, `sniff_*` and
# `*_scan`; `query` and its kin run SQL text, which would hide the reader from the check.
FILE_READERS = {"glob", "query", "query_table", "json_execute_serialized_sql"}
FILE_READER_PREFIXES = ("read_", "parquet_", "sniff_")
EXPLAIN_PREFIX = re.compile(r"^\s*EXPLAIN\s+(ANALYZE\s+)?(\([^)]*\)\s*)?", re.IGNORECASE)


@dataclass(frozen=True)
class Limits:
    """What one user statement may cost: wall time, rows returned, and memory (DuckDB's own
    working memory, and separately the result held in memory), with the flags that raise them."""

    timeout_s: float = TIMEOUT_S
    max_rows: int = MAX_ROWS
    max_mb: int = MAX_MB

    def __post_init__(self) -> None:
        checks = [
            ("--timeout", self.timeout_s, "seconds"),
            ("--max-rows", self.max_rows, "rows"),
            ("--max-mb", self.max_mb, "megabytes"),
        ]
        for flag, value, unit in checks:
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                raise UsageError(f"{flag} must be a number of {unit}, got {value!r}")
            if not math.isfinite(value) or value <= 0:
                raise UsageError(f"{flag} must be a positive number of {unit}, got {value}")
        if self.timeout_s > LONGEST_TIMEOUT_S:
            raise UsageError(
                f"--timeout must be at most {LONGEST_TIMEOUT_S} seconds (a week), got "
                f"{self.timeout_s:g}"
            )
        if self.max_mb < 16:
            raise UsageError(f"--max-mb must be at least 16 (DuckDB needs it), got {self.max_mb}")


def check_statement(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Exactly one statement, and a read: the sandbox refuses writes anyway, this names them.
    EXPLAIN ANALYZE runs what it explains, so the statement it wraps must be a read too."""
    try:
        statements = con.extract_statements(sql)
    except duckdb.Error as exc:
        raise UsageError(f"SQL error: {first_line(exc)}") from None
    if len(statements) != 1:
        raise UsageError(f"give exactly one SQL statement (got {len(statements)})")
    kind, text = statements[0].type.name, statements[0].query
    if kind == "EXPLAIN":
        text = EXPLAIN_PREFIX.sub("", text, count=1)
        try:
            kind = con.extract_statements(text)[0].type.name
        except (duckdb.Error, IndexError):
            kind = "EXPLAIN"  # not ours to parse: DuckDB's sandbox decides
    if kind not in READ_ONLY_STATEMENTS:
        raise UsageError(
            f"actstore sql is read-only: {kind} statements are refused; "
            "use SELECT (write results with actstore export)"
        )
    if kind == "SELECT":
        _check_sources(con, text)


def reads_files(function: str) -> bool:
    """A table function that reads files by name (or runs SQL text, which could)."""
    return function.startswith(FILE_READER_PREFIXES) or function.endswith("_scan") or (
        function in FILE_READERS)  # fmt: skip


def _check_sources(con: duckdb.DuckDBPyConnection, sql: str) -> None:
    """Refuse a read of a file by name: DuckDB's sandbox must let the connection read its own
    catalog file (and WAL), so `read_blob` or `FROM 'STORE/catalog.duckdb'` would read the
    catalog's bytes past its tables. Every source of the statement, nested ones included, is
    named in DuckDB's own parse of it."""
    found = con.execute("SELECT json_serialize_sql(?)", [sql]).fetchall()[0][0]
    tree = json.loads(found)
    if tree.get("error"):
        raise UsageError(
            f"SQL error: {tree.get('error_message') or 'the statement does not parse'}"
        )
    for kind, name in _sources(tree):
        if (kind == "TABLE_FUNCTION" and reads_files(name)) or (
            kind == "BASE_TABLE" and any(c in name for c in "./\\")
        ):
            what = f"{name}()" if kind == "TABLE_FUNCTION" else f"'{name}'"
            raise UsageError(
                f"actstore sql reads only the catalog's tables and views, not files: {what} is "
                "refused; SHOW TABLES lists what there is"
            )


def _sources(node: Any) -> Iterator[tuple[str, str]]:
    """(kind, name) of every table function and named table in a serialized statement."""
    if isinstance(node, dict):
        if node.get("type") == "TABLE_FUNCTION":
            yield "TABLE_FUNCTION", str(node.get("function", {}).get("function_name", ""))
        elif node.get("type") == "BASE_TABLE":
            yield "BASE_TABLE", str(node.get("table_name", ""))
        for value in node.values():
            yield from _sources(value)
    elif isinstance(node, list):
        for value in node:
            yield from _sources(value)


def run(
    con: duckdb.DuckDBPyConnection,
    catalog: Path,
    sql: str,
    params: list[Any] | None,
    limits: Limits,
) -> pl.DataFrame:
    """Run one user statement on a sandboxed connection and return its rows.

    A timer interrupts the statement at `limits.timeout_s`; the rows arrive in batches and the
    statement stops as soon as they pass `max_rows` or `max_mb`, so that neither a runaway
    statement nor a huge result holds the catalog or the machine's memory."""
    check_statement(con, sql)
    timer = threading.Timer(limits.timeout_s, con.interrupt)
    timer.daemon = True
    timer.start()
    rel = None
    try:
        rel = con.sql(sql, params=params or None)
        if rel is None:
            return pl.DataFrame()
        table = _fetch(_renderable(rel), limits)
    except duckdb.InterruptException:
        raise ActstoreError(
            f"the statement ran over {limits.timeout_s:g} s and was stopped; narrow it (WHERE, "
            "LIMIT) or raise --timeout"
        ) from None
    except duckdb.OutOfMemoryException:
        raise ActstoreError(
            f"the statement needs more than {limits.max_mb} MB of memory; narrow it (WHERE, "
            "LIMIT) or raise --max-mb"
        ) from None
    except duckdb.PermissionException as exc:
        raise UsageError(
            f"actstore sql reads only the catalog: {first_line(exc)}; write results with actstore "
            "export"
        ) from None
    except duckdb.IOException as exc:
        if _names_catalog(exc, catalog):
            raise  # the catalog file itself failed: the caller says it is damaged
        raise UsageError(f"SQL error: {first_line(exc)}") from None
    except (duckdb.InternalException, duckdb.SerializationException, duckdb.FatalException):
        raise
    except duckdb.Error as exc:
        hint = "; cast the column to text (column::VARCHAR)" if TOO_HUGE in str(exc) else ""
        raise UsageError(f"SQL error: {first_line(exc)}{hint}") from None
    finally:
        timer.cancel()
        # A relation keeps its DuckDB instance alive, and an exception's traceback keeps this
        # frame: dropped here, so the instance closes with the connection (a live one would be
        # handed to the next sandbox of this file, with this one's settings locked in).
        del rel
    return _finite(_frame(table))


def _fetch(rel: duckdb.DuckDBPyRelation, limits: Limits) -> Any:
    """The relation's rows as one Arrow table, refused once they pass the caps."""
    reader = rel.to_arrow_reader(BATCH_ROWS)
    try:
        return _collect(reader, limits)
    finally:
        reader.close()
        del reader, rel  # see run(): nothing may keep the instance alive


def _collect(reader: Any, limits: Limits) -> Any:
    import pyarrow as pa

    batches, rows, size = [], 0, 0
    for batch in reader:
        rows += batch.num_rows
        size += batch.nbytes
        if rows > limits.max_rows:
            raise UsageError(
                f"the result has over {limits.max_rows} rows; narrow it (WHERE, LIMIT, GROUP BY) "
                "or raise --max-rows"
            )
        if size > limits.max_mb * 2**20:
            raise UsageError(
                f"the result takes over {limits.max_mb} MB; narrow it (fewer columns, WHERE, "
                "LIMIT) or raise --max-mb"
            )
        batches.append(batch)
    table = pa.Table.from_batches(batches, schema=reader.schema)
    return table.rename_columns(_unique(table.column_names))


def _frame(table: Any) -> pl.DataFrame:
    """Arrow to polars; a type polars cannot take is one line naming the column to cast."""
    try:
        return pl.DataFrame(pl.from_arrow(table))
    except BaseException as exc:  # polars raises its Rust panics as BaseException
        if isinstance(exc, (KeyboardInterrupt, SystemExit)):
            raise
        raise UsageError(
            f"the result cannot be converted ({first_line(exc)}); cast the column to text in the "
            "query (column::VARCHAR)"
        ) from None


def _plain(t: duckdb.typing.DuckDBPyType, temporal: bool) -> bool:
    if t.id in PLAIN or (temporal and t.id in TEMPORAL):
        return True
    if t.id in NESTED:
        children = [c for name, c in t.children if name != "size"]
        return all(_plain(c, temporal=False) for c in children)
    return False


def _renderable(rel: duckdb.DuckDBPyRelation) -> duckdb.DuckDBPyRelation:
    """Columns of types polars cannot hold (or would alter) as DuckDB's text for them; seconds
    timestamps as microseconds (Arrow's seconds unit loses their infinities); 128-bit integers
    as the 38-digit decimals polars holds, refused beyond them."""
    exprs, changed = [], False
    for i, (name, t) in enumerate(zip(rel.columns, rel.types, strict=True), start=1):
        alias = '"' + name.replace('"', '""') + '"'
        if t.id == "timestamp_s":
            exprs.append(f"#{i}::TIMESTAMP AS {alias}")
        elif t.id in HUGE:
            exprs.append(f"#{i}::DECIMAL(38,0) AS {alias}")
        elif _plain(t, temporal=True):
            exprs.append(f"#{i} AS {alias}")
            continue
        else:
            exprs.append(f"#{i}::VARCHAR AS {alias}")
        changed = True
    return rel.project(", ".join(exprs)) if changed else rel


def _finite(df: pl.DataFrame) -> pl.DataFrame:
    """Date and timestamp columns holding ±infinity as text ('infinity', '-infinity', and the
    other values as dates): polars panics on reading such a value."""
    columns = []
    for name, dtype in df.schema.items():
        top = next((v for k, v in INFINITE.items() if isinstance(dtype, k) or dtype == k), None)
        if top is None:
            continue
        physical = pl.col(name).to_physical()
        if not df.select((physical.abs() == top).any()).item():
            continue
        finite = pl.when(physical.abs() == top).then(None).otherwise(physical).cast(dtype)
        columns.append(
            pl.when(physical == top).then(pl.lit("infinity"))
            .when(physical == -top).then(pl.lit("-infinity"))
            .otherwise(finite.cast(pl.String)).alias(name)
        )  # fmt: skip
    return df.with_columns(columns) if columns else df


def _unique(names: list[str]) -> list[str]:
    """Column names made unique as DuckDB does (a, a_1, …): polars refuses duplicates."""
    seen: set[str] = set()
    out = []
    for name in names:
        new, n = name, 0
        while new in seen:
            n += 1
            new = f"{name}_{n}"
        seen.add(new)
        out.append(new)
    return out


def _names_catalog(exc: Exception, catalog: Path) -> bool:
    """Whether an I/O error is about the catalog file (damage), not a path the statement named."""
    paths = re.findall(r'"([^"]+)"', str(exc))
    own = {catalog.absolute(), Path(f"{catalog}.wal").absolute()}
    return not paths or any(Path(p).absolute() in own for p in paths)
