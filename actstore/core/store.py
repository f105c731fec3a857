"""The store: one directory holding `catalog.duckdb` and `arrays.zarr/` (and the `manifests/` of
sharded ingests until they are merged).

`Store` reads everything (runs, prompts, arrays, SQL, exports) without importing torch. Writing
commands take the writer lock with `store.writer()` for their whole duration, and write catalog
rows only through `store.transaction()` (actstore.core.writes). Arrays are read
through `VerifiedArray`, so damaged data is an error, never numbers; user SQL runs in DuckDB's
sandbox, so it can neither change the store nor reach other files.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from actstore.core import arrays as zarrays
from actstore.core import sandbox
from actstore.core.arrays import ARRAYS
from actstore.core.catalog import SCHEMA_VERSION, Catalog
from actstore.core.errors import ActstoreError, DamagedError, UsageError, first_line
from actstore.core.location import CATALOG, RECORD, arrays_root, local_dir, record_arrays_url
from actstore.core.lock import WriterLock, describe_holder
from actstore.core.verified import FIX, Ledger, LedgerEntry, VerifiedArray
from actstore.core.writes import Writes

MANIFESTS = "manifests"
# What a directory holds before its catalog exists: shards write arrays and manifests first.
BEFORE_CATALOG = {"writer.lock", ARRAYS, MANIFESTS, RECORD}
# A transaction of a command that does not hold the writer (a query recording its result) waits
# this long for another process's writer: two queries finishing together both record.
TRANSACTION_WAIT_S = 30.0


class Store:
    """A store directory; every read verb returns a polars DataFrame."""

    def __init__(self, path: str | Path, create: bool = False):
        """Open the store at `path`. With `create`, a store that is not there yet is only
        checked for (the location can become one): its directory and catalog are made by its
        first writer (`writer()`), so that a command refused on its inputs leaves nothing."""
        self.location = str(path)
        self.path = local_dir(path)
        check_location(self.path, create)
        self.arrays_root = arrays_root(self.path)  # STORE/arrays.zarr or an object-store URL
        self.lock = WriterLock(self.path)
        self.catalog = Catalog(self.path / CATALOG, holder=self._holder)
        self._ledgers: dict[int, dict[tuple[str, str], Ledger]] = {}
        self._metadata: dict[int, dict[tuple[str, str], str | None]] = {}
        # An older catalog is read as it is and migrated by the first writer (`writer()`).
        self.outdated = False
        # False until the store is made: a new path, or a creation that was killed early.
        self.exists = (self.path / CATALOG).exists() and not (create and self.catalog.is_empty())
        if not self.exists and not create:
            raise self._missing()
        if self.exists:
            self.outdated = self.catalog.check_version() < SCHEMA_VERSION

    def _missing(self) -> ActstoreError:
        what = "does not exist" if not self.path.exists() else "is not an actstore store"
        return ActstoreError(f"{self.path} {what} (no {CATALOG}); create one with actstore ingest")

    def check_exists(self) -> None:
        """Refuse to read a store that is not made yet (opened with `create`, not written
        since), as opening a missing one is refused; one that another process made since is
        read."""
        if self.exists:
            return
        if not (self.path / CATALOG).exists():
            raise self._missing()
        # an empty catalog (a creation killed early) is refused here, naming the fix
        self.outdated = self.catalog.check_version() < SCHEMA_VERSION
        self.exists = True

    def keep_arrays_at(self, url: str | None) -> None:
        """Record where a new store's arrays go (an object-store URL, checked beforehand by
        `location.check_arrays_url`) and claim that prefix: the first write of an ingest that
        asked for `--arrays-url`, made once its inputs are checked. None keeps them where they
        are (STORE/arrays.zarr, or the URL recorded before)."""
        record_arrays_url(self.path, url)
        self.arrays_root = arrays_root(self.path)

    def _holder(self) -> str:
        return describe_holder(self.lock.path)

    def __repr__(self) -> str:
        return f"Store({str(self.path)!r})"

    @contextmanager
    def writer(self, command: str | None = None, wait_s: float = 0.0) -> Iterator[Store]:
        """Hold the writer lock for a writing command, from before its first check to its end:
        the one way any command takes it. Nested uses share the outermost one. A store opened
        with `create` is made here (directory, catalog, arrays root), an older catalog migrates
        here, so that the command reads the current schema; otherwise nothing is written here,
        and the command's first transaction brings the views up to date.
        `wait_s`: how long to wait for another process's writer first."""
        if self.lock.held:
            yield self
            return
        if not self.exists:
            try:
                self.path.mkdir(parents=True, exist_ok=True)
            except OSError as exc:
                raise ActstoreError(f"cannot create store {self.path}: {exc.strerror}") from None
        self.lock.acquire(command, wait_s)
        self.catalog.writing, self.catalog.current = True, False
        try:
            if self.outdated or not self.exists:
                self.catalog.migrate()  # a new store's catalog is made here
                self.outdated = False
            if not self.exists:  # its arrays go where its first ingest recorded
                self.arrays_root = arrays_root(self.path)
                zarrays.open_root(self.arrays_root, mode="a")
                self.exists = True
            yield self
        finally:
            self.catalog.writing = self.catalog.current = False
            self.lock.release()

    @contextmanager
    def transaction(self) -> Iterator[Writes]:
        """One catalog transaction under the writer lock (taken here when the command does not
        hold it yet, after waiting up to TRANSACTION_WAIT_S for another process's short write):
        every row written through the `Writes` lands, or none of them."""
        with self.writer(wait_s=TRANSACTION_WAIT_S), self.catalog.write() as con:
            yield Writes(con)

    def check_writable(self) -> None:
        """Fail now, not after a long computation, if results could not be recorded: the store
        is read-only or another process (an ingest) holds the writer lock."""
        if self.lock.held or not (self.path / CATALOG).exists():
            return  # a store not made yet: its location was checked when it was opened
        self.lock.acquire("check writable")
        self.lock.release()
        self.catalog.check_intact()
        if not os.access(self.catalog.path, os.W_OK):
            raise ActstoreError(
                f"catalog {self.catalog.path} is not writable; this command records its results "
                "in the store (work on a writable copy: cp -r STORE COPY)"
            )
        if self.outdated:  # the query reads the current schema before it records
            with self.writer("migrate catalog"):
                pass

    # ---- reading -------------------------------------------------------------------------

    def reading(self) -> AbstractContextManager[None]:
        """The reads inside the block share one catalog connection (`Catalog.reading`): for a
        burst of small reads, never around a computation or a write."""
        self.check_exists()
        return self.catalog.reading()

    def query(
        self,
        sql: str,
        params: list[Any] | None = None,
        timeout: float = sandbox.TIMEOUT_S,
        max_rows: int = sandbox.MAX_ROWS,
        max_mb: int = sandbox.MAX_MB,
    ) -> pl.DataFrame:
        """Run one read-only SQL statement (SELECT, WITH … SELECT, EXPLAIN) against the catalog
        in DuckDB's sandbox, stopped after `timeout` seconds, refused past `max_rows` rows or
        `max_mb` MB of memory (see docs/reliability.md).

        The sandbox (`Catalog.sandbox`) is what keeps the store and other files safe; the
        statement-type check only gives writes a clearer message."""
        limits = sandbox.Limits(timeout, max_rows, max_mb)
        self.check_exists()
        with self.catalog.sandbox(limits.max_mb) as con:
            return sandbox.run(con, self.catalog.path, sql, params, limits)

    def sql(
        self,
        sql: str,
        timeout: float = sandbox.TIMEOUT_S,
        max_rows: int = sandbox.MAX_ROWS,
        max_mb: int = sandbox.MAX_MB,
    ) -> pl.DataFrame:
        """`query` without parameters: what `actstore sql` runs."""
        return self.query(sql, None, timeout, max_rows, max_mb)

    def _trusted_query(self, sql: str, params: list[Any] | None = None) -> pl.DataFrame:
        """actstore's own SQL against the catalog, outside the sandbox and without limits:
        never pass it text a user wrote (that goes through `query`)."""
        self.check_exists()
        with self.catalog.read() as con:
            rel = con.sql(sql, params=params or None)
            return rel.pl() if rel is not None else pl.DataFrame()

    def runs(self) -> pl.DataFrame:
        return self._trusted_query("SELECT * FROM runs ORDER BY run_id")

    def run(self, run: int, complete: bool = True) -> dict[str, Any]:
        """One run's catalog row as a dict; a missing or unfinished run is an error."""
        rows = self._trusted_query("SELECT * FROM runs WHERE run_id = ?", [run]).to_dicts()
        if not rows:
            known = self._trusted_query("SELECT run_id FROM runs ORDER BY run_id")[
                "run_id"
            ].to_list()
            raise UsageError(
                f"run {run} is not in {self.path} (runs: {known or 'none'}); see actstore info"
            )
        row = rows[0]
        row["params"] = json.loads(row["params"])
        row["hooks"] = json.loads(row["hooks"])
        if complete and row["status"] != "complete":
            raise ActstoreError(
                f"run {run} is {row['status']}, not complete; rerun its ingest command to resume it"
            )
        return row

    def prompts(
        self,
        run: int,
        columns: Sequence[str] | None = None,
        lo: int | None = None,
        hi: int | None = None,
    ) -> pl.DataFrame:
        """A run's prompts in prompt order: every column, or only `columns`; every prompt, or only
        prompts [lo, hi). A query reads the columns it needs one span at a time, so its memory
        does not grow with the run (the texts stay in the catalog)."""
        where, params = "run_id = ?", [run]
        if lo is not None:
            where, params = f"{where} AND prompt_idx >= ?", [*params, int(lo)]
        if hi is not None:
            where, params = f"{where} AND prompt_idx < ?", [*params, int(hi)]
        with self.reading():  # the column check and the read: one catalog connection
            names = "*"
            if columns is not None:
                names = ", ".join(f'"{c}"' for c in self.check_prompt_columns(columns))
            return self._trusted_query(
                f"SELECT {names} FROM prompts WHERE {where} ORDER BY prompt_idx", params
            )

    def prompt_columns(self) -> list[str]:
        """The prompts table's columns as the catalog lists them (a task's own, e.g. `grp`,
        included): the only names `prompts(columns=…)` puts into SQL."""
        return self._trusted_query("SELECT * FROM prompts LIMIT 0").columns

    def check_prompt_columns(
        self, columns: Sequence[str], option: str | None = None, others: Sequence[str] = ()
    ) -> list[str]:
        """`columns` if each is a prompts column (or one of `others`, names the caller accepts
        besides), else a one-line usage error naming the first that is not, after the `option`
        it came from, and what to use instead."""
        known = self.prompt_columns()
        for c in columns:
            if c not in known and c not in others:
                label = f"{option} {c}" if option else repr(c)
                choices = ", ".join([*others, *(k for k in known if k != "run_id")])
                raise UsageError(f"{label}: not a prompts column; use one of {choices}")
        return list(columns)

    def arrays(self, run: int | None = None) -> pl.DataFrame:
        where = "" if run is None else f"WHERE run_id = {int(run)}"
        return self._trusted_query(f"SELECT * FROM arrays {where} ORDER BY run_id, side, hook")

    def info(self) -> pl.DataFrame:
        """One row per run: what it holds, bytes raw vs stored, compression ratio, stored bytes
        per prompt, how many hooks it derives on read rather than stores, status."""
        return self._trusted_query(
            """
            SELECT r.run_id, r.model, r.task, r.corruption, r.n_prompts, r.status, r.dtype,
                   count(a.hook) AS n_arrays,
                   coalesce(sum(a.raw_bytes), 0)::BIGINT AS raw_bytes,
                   coalesce(sum(a.stored_bytes), 0)::BIGINT AS stored_bytes,
                   round(coalesce(sum(a.raw_bytes), 0) / greatest(sum(a.stored_bytes), 1), 2)
                       AS ratio,
                   (coalesce(sum(a.stored_bytes), 0) / greatest(max(r.n_prompts), 1))::BIGINT
                       AS bytes_per_prompt,
                   coalesce(json_array_length(r.params, '$.derived'), 0)::INTEGER AS n_derived
            FROM runs r LEFT JOIN arrays a USING (run_id)
            GROUP BY ALL ORDER BY r.run_id
            """
        )

    def hooks(self, run: int, side: str = "clean") -> list[str]:
        df = self._trusted_query(
            "SELECT hook FROM arrays WHERE run_id = ? AND side = ? ORDER BY hook", [run, side]
        )
        return df["hook"].to_list()

    def ledger(self, run: int, side: str, hook: str, reload: bool = False) -> Ledger:
        """The chunk ledger of one array (chunk index -> prompt range and checksum), cached per
        run; `reload` reads the run's rows again (an ingest may have recorded more)."""
        if reload or run not in self._ledgers:
            with self.reading():
                rows = self._trusted_query(
                    "SELECT side, hook, chunk_idx, prompt_start, prompt_stop, checksum "
                    "FROM chunks WHERE run_id = ?",
                    [run],
                )
                arrays = self.arrays(run)
            per_array: dict[tuple[str, str], Ledger] = {}
            for sd, hk, idx, lo, hi, checksum in rows.iter_rows():
                per_array.setdefault((sd, hk), {})[int(idx)] = LedgerEntry(lo, hi, checksum)
            self._ledgers[run] = per_array
            self._metadata[run] = {
                (row["side"], row["hook"]): zarrays.expected_metadata(row)
                for row in arrays.iter_rows(named=True)
            }
            if per_array:
                self.check_arrays_root()
        return self._ledgers[run].get((side, hook), {})

    def check_arrays_root(self) -> None:
        """Refuse to read arrays under a root group whose metadata is gone or garbage (zarr
        would open the arrays below it regardless): one line naming the repair."""
        problem = zarrays.root_problem(self.arrays_root)
        if problem is not None:
            raise DamagedError(
                f"the arrays' root group metadata {self.arrays_root.show('zarr.json')} "
                f"{problem}; {FIX}"
            )

    def array(self, run: int, side: str, hook: str) -> VerifiedArray:
        """The array of (run, side, hook), every chunk read checked against the ledger; a clear
        error naming what is stored otherwise."""
        ledger = self.ledger(run, side, hook)
        try:
            return VerifiedArray(
                self.arrays_root, run, side, hook, ledger,
                refresh=lambda: self.ledger(run, side, hook, reload=True),
                metadata=self._metadata[run].get((side, hook)),
            )  # fmt: skip
        except DamagedError:
            raise
        except Exception as exc:  # no metadata, or metadata zarr cannot read
            missing = exc
        name = zarrays.array_name(run, side, hook)
        if ledger:
            raise DamagedError(
                f"run {run} {side} {hook}: the array {self.arrays_root.show(name)} cannot be "
                f"opened ({first_line(missing)}); {FIX}"
            )
        stored = self.hooks(run, side)
        if not stored:
            raise UsageError(f"run {run} has no {side!r} side in {self.path}")
        if self.derives(run, side, hook):
            raise UsageError(
                f"hook {hook!r} of run {run} is derived on read from the hooks it stores, not "
                f"stored: compute it with the run's model by actstore.open(path).read({run}, "
                f"{side!r}, {hook!r}, derive=True), or store it too by ingesting again with "
                f"--hooks default,{hook}"
            )
        raise UsageError(
            f"hook {hook!r} is not stored for run {run} ({side}); stored hooks include "
            f"{', '.join(stored[:6])}…; re-ingest with --hooks to add it"
        )

    def derives(self, run: int, side: str, hook: str) -> bool:
        """Whether the run derives the hook on read (actstore.model.derivable) rather than
        stores it."""
        derived = self.run(run, complete=False)["params"].get("derived", [])
        return hook in derived and hook not in self.hooks(run, side)

    def read(
        self, run: int, side: str, hook: str, start: int = 0, stop: int | None = None
    ) -> np.ndarray:
        """Activations of run `run`'s prompts [start, stop) as a numpy array, every chunk
        verified; `run` as every verb names it."""
        return self.array(run, side, hook)[start:stop]

    def export(
        self,
        table: str | None = None,
        sql: str | None = None,
        fmt: str = "csv",
        out: str = "-",
        timeout: float = sandbox.TIMEOUT_S,
        max_rows: int = sandbox.MAX_ROWS,
        max_mb: int = sandbox.MAX_MB,
    ) -> pl.DataFrame:
        """Write a table, a view or a read-only query's rows to a file or stdout ('-'); the
        statement runs as `query` does, under the same limits."""
        from actstore.core.output import export_frame, refuse_inside_store

        if out != "-":
            refuse_inside_store(out, "-o")
        if (table is None) == (sql is None):
            raise UsageError("give a TABLE or --sql QUERY (exactly one)")
        if table is not None:
            names = table_names(self)
            if table not in names:
                raise UsageError(f"no table or view {table!r}; choose one of: {', '.join(names)}")
            sql = f'SELECT * FROM "{table}"'
        df = self.sql(sql, timeout, max_rows, max_mb)
        export_frame(df, fmt, out)
        return df


def check_location(path: Path, create: bool = False) -> None:
    """Refuse, before anything is read or written, a path that is not (and, with `create`,
    cannot become) a store: a regular file, a non-empty other directory, a read-only place."""
    if path.exists() and not path.is_dir():
        raise UsageError(f"{path} is a file, not a store directory; give a directory path")
    if not create or (path / CATALOG).exists():
        return
    if path.exists() and any(p.name not in BEFORE_CATALOG for p in path.iterdir()):
        raise UsageError(
            f"{path} exists, is not empty and is not an actstore store; choose a new or empty "
            "directory"
        )
    parent = next(p for p in [path, *path.absolute().parents] if p.exists())
    if not parent.is_dir():
        raise UsageError(f"{parent} is a file, so {path} cannot be created; choose another path")
    if not os.access(parent, os.W_OK):
        raise ActstoreError(f"cannot create store {path}: {parent} is not writable")


def table_names(store: Store) -> list[str]:
    """Tables and views of the catalog that export and sql can read."""
    df = store._trusted_query(
        "SELECT table_name FROM information_schema.tables WHERE table_schema = 'main' "
        "AND table_catalog = current_database() "
        "ORDER BY table_name"
    )
    return df["table_name"].to_list()


def check_store(store: object, verb: str, create: bool = True) -> None:
    """Refuse a path where a verb takes a Store: the caller opens the store (with `create`,
    made by the verb's first write, after its inputs are checked)."""
    if isinstance(store, Store):
        return
    how = "actstore.open(path, create=True) or Store(path, create=True)"
    if not create:
        how = "actstore.open(path) or Store(path)"
    raise UsageError(f"{verb} takes a Store, not {store!r}: pass {how}")
