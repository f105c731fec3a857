"""The store: one directory holding `catalog.duckdb` and `arrays.zarr/`.

`Store` reads everything (runs, prompts, arrays, SQL, exports) without importing torch; writing
commands take the writer lock with `store.writer()` for their whole duration.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from actstore import arrays as zarrays
from actstore.catalog import SCHEMA_VERSION, Catalog
from actstore.errors import ActstoreError, UsageError
from actstore.location import local_dir
from actstore.lock import WriterLock, describe_holder

CATALOG = "catalog.duckdb"
ARRAYS = "arrays.zarr"
READ_ONLY_STATEMENTS = {"SELECT", "EXPLAIN"}


class Store:
    """A store directory; every read verb returns a polars DataFrame."""

    def __init__(self, path: str | Path, create: bool = False):
        self.location = str(path)
        self.path = local_dir(path)
        self.lock = WriterLock(self.path)
        self.catalog = Catalog(self.path / CATALOG, holder=self._holder)
        if create and not (self.path / CATALOG).exists():
            if self.path.exists() and any(p.name != "writer.lock" for p in self.path.iterdir()):
                raise UsageError(
                    f"{self.path} exists, is not empty and is not an actstore store; "
                    "choose a new or empty directory"
                )
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ActstoreError(f"cannot create store {self.path}: {exc.strerror}") from None
            with self.writer("create store"):
                zarrays.open_root(self.path, mode="a")
        elif create and self.catalog.is_empty():
            with self.writer("create store"):  # finish a creation that was interrupted
                zarrays.open_root(self.path, mode="a")
        elif not (self.path / CATALOG).exists():
            what = "does not exist" if not self.path.exists() else "is not an actstore store"
            raise ActstoreError(
                f"{self.path} {what} (no {CATALOG}); create one with actstore ingest"
            )
        elif self.catalog.check_version() < SCHEMA_VERSION:
            with self.writer("migrate catalog"):  # an older catalog migrates when first opened
                pass

    def _holder(self) -> str:
        return describe_holder(self.lock.path)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    @contextmanager
    def writer(self, command: str | None = None) -> Iterator[Store]:
        """Hold the writer lock (and migrate the schema) for a writing command."""
        acquired = not self.lock.held
        if acquired:
            self.lock.acquire(command)
        was_writing = self.catalog.writing
        self.catalog.writing = True
        try:
            if not was_writing:
                self.catalog.migrate()
            yield self
        finally:
            self.catalog.writing = was_writing
            if acquired:
                self.lock.release()

    # ---- reading -------------------------------------------------------------------------

    def query(self, sql: str, params: list[Any] | None = None) -> pl.DataFrame:
        """Run one SQL statement against the catalog and return its rows."""
        with self.catalog.read() as con:
            rel = con.sql(sql, params=params or None)
            return rel.pl() if rel is not None else pl.DataFrame()

    def sql(self, sql: str) -> pl.DataFrame:
        """Run a read-only SQL statement (SELECT, WITH … SELECT, EXPLAIN); refuse writes."""
        import duckdb

        with self.catalog.read() as con:
            try:
                statements = con.extract_statements(sql)
            except duckdb.Error as exc:
                raise UsageError(f"SQL error: {_first_line(exc)}") from None
            if len(statements) != 1:
                raise UsageError(f"give exactly one SQL statement (got {len(statements)})")
            kind = statements[0].type.name
            if kind not in READ_ONLY_STATEMENTS:
                raise UsageError(
                    f"actstore sql is read-only: {kind} statements are refused; "
                    "use SELECT (write results with actstore export)"
                )
            try:
                rel = con.sql(sql)
                return rel.pl() if rel is not None else pl.DataFrame()
            except duckdb.Error as exc:
                raise UsageError(f"SQL error: {_first_line(exc)}") from None

    def runs(self) -> pl.DataFrame:
        return self.query("SELECT * FROM runs ORDER BY run_id")

    def run(self, run_id: int, complete: bool = True) -> dict[str, Any]:
        """One run's catalog row as a dict; a missing or unfinished run is an error."""
        rows = self.query("SELECT * FROM runs WHERE run_id = ?", [run_id]).to_dicts()
        if not rows:
            known = self.query("SELECT run_id FROM runs ORDER BY run_id")["run_id"].to_list()
            raise UsageError(
                f"run {run_id} is not in {self.path} (runs: {known or 'none'}); see actstore info"
            )
        row = rows[0]
        row["params"] = json.loads(row["params"])
        row["hooks"] = json.loads(row["hooks"])
        if complete and row["status"] != "complete":
            raise ActstoreError(
                f"run {run_id} is {row['status']}, not complete; rerun its ingest command "
                "to resume it"
            )
        return row

    def prompts(self, run_id: int) -> pl.DataFrame:
        return self.query("SELECT * FROM prompts WHERE run_id = ? ORDER BY prompt_idx", [run_id])

    def arrays(self, run_id: int | None = None) -> pl.DataFrame:
        where = "" if run_id is None else f"WHERE run_id = {int(run_id)}"
        return self.query(f"SELECT * FROM arrays {where} ORDER BY run_id, side, hook")

    def info(self) -> pl.DataFrame:
        """One row per run: what it holds, bytes raw vs stored, compression ratio, status."""
        return self.query(
            """
            SELECT r.run_id, r.model, r.task, r.corruption, r.n_prompts, r.status, r.dtype,
                   count(a.hook) AS n_arrays,
                   coalesce(sum(a.raw_bytes), 0)::BIGINT AS raw_bytes,
                   coalesce(sum(a.stored_bytes), 0)::BIGINT AS stored_bytes,
                   round(coalesce(sum(a.raw_bytes), 0) / greatest(sum(a.stored_bytes), 1), 2)
                       AS ratio
            FROM runs r LEFT JOIN arrays a USING (run_id)
            GROUP BY ALL ORDER BY r.run_id
            """
        )

    def hooks(self, run_id: int, side: str = "clean") -> list[str]:
        df = self.query(
            "SELECT hook FROM arrays WHERE run_id = ? AND side = ? ORDER BY hook", [run_id, side]
        )
        return df["hook"].to_list()

    def array(self, run_id: int, side: str, hook: str):
        """The zarr array of (run, side, hook); a clear error naming what is stored otherwise."""
        name = zarrays.array_name(run_id, side, hook)
        root = zarrays.open_root(self.path, mode="r")
        if name not in root:
            stored = self.hooks(run_id, side)
            if not stored:
                raise UsageError(f"run {run_id} has no {side!r} side in {self.path}")
            raise UsageError(
                f"hook {hook!r} is not stored for run {run_id} ({side}); stored hooks include "
                f"{', '.join(stored[:6])}…; re-ingest with --hooks to add it"
            )
        return root[name]

    def read(
        self, run_id: int, side: str, hook: str, start: int = 0, stop: int | None = None
    ) -> np.ndarray:
        """Activations of prompts [start, stop) as a numpy array."""
        arr = self.array(run_id, side, hook)
        return np.asarray(arr[start : arr.shape[0] if stop is None else stop])

    def export(
        self, table: str | None = None, sql: str | None = None, fmt: str = "csv", out: str = "-"
    ) -> pl.DataFrame:
        """Write a table, a view or a read-only query's rows to a file or stdout ('-')."""
        from actstore.output import export_frame

        if (table is None) == (sql is None):
            raise UsageError("give a TABLE or --sql QUERY (exactly one)")
        if table is not None:
            names = table_names(self)
            if table not in names:
                raise UsageError(f"no table or view {table!r}; choose one of: {', '.join(names)}")
            sql = f'SELECT * FROM "{table}"'
        df = self.sql(sql)
        export_frame(df, fmt, out)
        return df

    # ---- results -------------------------------------------------------------------------

    def next_id(self, con: Any, table: str, column: str) -> int:
        return int(
            con.execute(f"SELECT coalesce(max({column}), 0) + 1 FROM {table}").fetchall()[0][0]
        )


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def table_names(store: Store) -> list[str]:
    """Tables and views of the catalog that export and sql can read."""
    df = store.query(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' "
        "ORDER BY table_name"
    )
    return df["table_name"].to_list()
