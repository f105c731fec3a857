"""The DuckDB catalog: schema, migrations, and short-lived connections.

Connections are opened per transaction and closed right after, so that readers in other
processes can open the file between an ingest's batches (DuckDB allows one read-write process at
a time and refuses read-only openers while it is open; see STACK-NOTES). A lock conflict is
retried for a few seconds before it becomes a one-line error naming the writer.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path

import duckdb

from actstore.errors import ActstoreError
from actstore.views import create_views

SCHEMA_VERSION = 2

# Each entry migrates a catalog from version i to i + 1; MIGRATIONS[0] creates version 1.
MIGRATIONS: list[list[str]] = [
    [
        "CREATE TABLE meta (key VARCHAR PRIMARY KEY, value VARCHAR)",
        """CREATE TABLE models (
            model VARCHAR PRIMARY KEY, fingerprint VARCHAR, source VARCHAR,
            n_layers INTEGER, n_heads INTEGER, d_model INTEGER, d_head INTEGER,
            d_mlp INTEGER, d_vocab INTEGER, n_ctx INTEGER, created_at TIMESTAMP)""",
        """CREATE TABLE runs (
            run_id INTEGER PRIMARY KEY, model VARCHAR, task VARCHAR, corruption VARCHAR,
            n_prompts INTEGER, status VARCHAR, params VARCHAR, params_hash VARCHAR,
            seq_len INTEGER, dtype VARCHAR, batch_size INTEGER, seed INTEGER,
            hooks VARCHAR, dataset VARCHAR, created_at TIMESTAMP, completed_at TIMESTAMP,
            wall_s DOUBLE)""",
        """CREATE TABLE prompts (
            run_id INTEGER, prompt_idx INTEGER, clean_text VARCHAR, corrupted_text VARCHAR,
            answer VARCHAR, wrong_answer VARCHAR, clean_logit_diff DOUBLE,
            corrupted_logit_diff DOUBLE, clean_prob DOUBLE, corrupted_prob DOUBLE,
            answer_token INTEGER, wrong_answer_token INTEGER, seq_len INTEGER,
            clean_tokens INTEGER[], corrupted_tokens INTEGER[], grp VARCHAR,
            PRIMARY KEY (run_id, prompt_idx))""",
        """CREATE TABLE arrays (
            run_id INTEGER, side VARCHAR, hook VARCHAR, shape VARCHAR, dtype VARCHAR,
            chunks VARCHAR, codec VARCHAR, raw_bytes BIGINT, stored_bytes BIGINT,
            path VARCHAR, n_chunks INTEGER, PRIMARY KEY (run_id, side, hook))""",
        """CREATE TABLE chunks (
            run_id INTEGER, side VARCHAR, hook VARCHAR, chunk_idx INTEGER,
            prompt_start INTEGER, prompt_stop INTEGER, checksum VARCHAR, nbytes BIGINT,
            written_at TIMESTAMP, PRIMARY KEY (run_id, side, hook, chunk_idx))""",
        """CREATE TABLE queries (
            query_id INTEGER PRIMARY KEY, run_id INTEGER, kind VARCHAR, params VARCHAR,
            params_hash VARCHAR, created_at TIMESTAMP, wall_s DOUBLE)""",
        """CREATE TABLE effects (
            query_id INTEGER, layer INTEGER, head INTEGER, pos INTEGER, metric VARCHAR,
            value DOUBLE, normalized DOUBLE)""",
        """CREATE TABLE edge_scores (
            score_id INTEGER, run_id INTEGER, method VARCHAR, src VARCHAR, dst VARCHAR,
            qkv VARCHAR, score DOUBLE)""",
        # Circuits (queries/circuits.py): circuit_id is the circuit query's id; top_n is the
        # number of top-|score| edges selected, n_edges what remains after pruning; metric_value
        # is m(C), clean/corrupted_metric the denominators' ends. The curve holds every circuit
        # the query evaluated (its search points), keyed by the circuit query.
        """CREATE TABLE circuits (
            circuit_id INTEGER PRIMARY KEY, score_id INTEGER, n_edges INTEGER,
            faithfulness DOUBLE, params VARCHAR, created_at TIMESTAMP, top_n INTEGER,
            metric VARCHAR, metric_value DOUBLE, clean_metric DOUBLE, corrupted_metric DOUBLE)""",
        """CREATE TABLE circuit_edges (
            circuit_id INTEGER, src VARCHAR, dst VARCHAR, qkv VARCHAR, score DOUBLE)""",
        """CREATE TABLE faithfulness_curve (
            circuit_id INTEGER, score_id INTEGER, n_edges INTEGER, faithfulness DOUBLE,
            top_n INTEGER, metric_value DOUBLE)""",
        # Subspace patching (queries/subspace_query.py): one report row per component
        # (v, row, null, full) and the patched basis, one vector per row.
        """CREATE TABLE subspace_reports (
            query_id INTEGER, run_id INTEGER, hook VARCHAR, layer INTEGER, head INTEGER,
            pos VARCHAR, mode VARCHAR, metric VARCHAR, split VARCHAR, n_prompts INTEGER,
            component VARCHAR, dim INTEGER, norm_sq DOUBLE, variance DOUBLE, value DOUBLE,
            normalized DOUBLE, effect DOUBLE, illusion BOOLEAN)""",
        """CREATE TABLE subspace_directions (
            query_id INTEGER, idx INTEGER, vector DOUBLE[])""",
        # Out-of-core reductions over prompts (queries/reduce.py): per group, position and flat
        # feature index (head for head-norm), the mean and the number of prompts behind it.
        """CREATE TABLE reductions (
            query_id INTEGER, hook VARCHAR, grp VARCHAR, pos INTEGER, idx INTEGER,
            value DOUBLE, n INTEGER)""",
    ],
    # The model's architecture description (actstore.architecture.Architecture as JSON); NULL
    # for models recorded before it existed, all of them GPT-2.
    ["ALTER TABLE models ADD COLUMN architecture VARCHAR"],
]


READ_WAIT_S = 10.0
WRITE_WAIT_S = 120.0


def _first(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _is_lock_conflict(exc: Exception) -> bool:
    text = str(exc)
    return "lock" in text.lower() and ("Conflicting" in text or "Could not set lock" in text)


class Catalog:
    """The catalog file of one store."""

    def __init__(self, path: Path, holder: Callable[[], str] = lambda: "another process"):
        self.path = Path(path)
        self.writing = False
        self.holder = holder

    def _connect(self, read_only: bool, wait_s: float | None = None) -> duckdb.DuckDBPyConnection:
        """Open the file, retrying while another process has it open.

        A reader waits up to READ_WAIT_S for the writer's current transaction; the writer waits
        up to WRITE_WAIT_S for readers (a long export), so that a reader never fails an ingest.
        """
        if wait_s is None:
            wait_s = READ_WAIT_S if read_only else WRITE_WAIT_S
        deadline = time.monotonic() + wait_s
        delay = 0.02
        while True:
            try:
                return duckdb.connect(str(self.path), read_only=read_only)
            except duckdb.Error as exc:
                if not _is_lock_conflict(exc):
                    raise ActstoreError(f"cannot open catalog {self.path}: {_first(exc)}") from None
                if time.monotonic() > deadline:
                    who = "a reader in another process" if self.writing else self.holder()
                    raise ActstoreError(
                        f"catalog {self.path} is held open by {who} for over {wait_s:.0f} s; "
                        "retry when it finishes, or query a copy (cp catalog.duckdb snap.duckdb)"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.25)

    @contextmanager
    def read(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection for reading; read-write when this process is the writer."""
        con = self._connect(read_only=not self.writing)
        try:
            yield con
        finally:
            con.close()

    @contextmanager
    def write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write connection inside one transaction: all of it lands or none of it."""
        if not self.writing:
            raise RuntimeError("catalog write without the store's writer lock")
        con = self._connect(read_only=False)
        try:
            con.execute("BEGIN TRANSACTION")
            try:
                yield con
            except BaseException:
                con.execute("ROLLBACK")
                raise
            con.execute("COMMIT")
            con.execute("CHECKPOINT")
        finally:
            con.close()

    def version(self, con: duckdb.DuckDBPyConnection) -> int:
        rows = con.execute("SELECT value FROM meta WHERE key = 'schema_version'").fetchall()
        return int(rows[0][0]) if rows else 0

    def migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION; refuse a catalog from a newer actstore."""
        with self.write() as con:
            exists = con.execute(
                "SELECT count(*) FROM information_schema.tables WHERE table_name = 'meta'"
            ).fetchall()[0][0]
            current = self.version(con) if exists else 0
            if current > SCHEMA_VERSION:
                raise ActstoreError(
                    f"catalog schema version {current} is newer than this actstore supports "
                    f"({SCHEMA_VERSION}); upgrade actstore"
                )
            for version in range(current, SCHEMA_VERSION):
                for statement in MIGRATIONS[version]:
                    con.execute(statement)
            con.execute(
                "INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", [str(SCHEMA_VERSION)]
            )
            create_views(con)

    def is_empty(self) -> bool:
        """True for a catalog file without tables: a store whose creation was interrupted."""
        with self.read() as con:
            return not con.execute("SELECT count(*) FROM information_schema.tables").fetchall()[0][
                0
            ]

    def check_version(self) -> None:
        """Refuse to read a catalog that this version cannot interpret."""
        with self.read() as con:
            try:
                current = self.version(con)
            except duckdb.CatalogException:
                if self.is_empty():
                    raise ActstoreError(
                        f"{self.path} has no tables: creating the store was interrupted; rerun "
                        "the ingest command to finish it"
                    ) from None
                raise ActstoreError(
                    f"{self.path} is not an actstore catalog (no meta table)"
                ) from None
        if current > SCHEMA_VERSION:
            raise ActstoreError(
                f"catalog schema version {current} is newer than this actstore supports "
                f"({SCHEMA_VERSION}); upgrade actstore"
            )
        if current < SCHEMA_VERSION:
            raise ActstoreError(
                f"catalog schema version {current} is older than {SCHEMA_VERSION}; run any "
                "write command (e.g. actstore ingest) once to migrate it"
            )
