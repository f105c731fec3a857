"""The DuckDB catalog: schema, migrations, and short-lived connections.

Connections are opened per transaction and closed right after, so that readers in other
processes can open the file between an ingest's batches (DuckDB allows one read-write process at
a time and refuses read-only openers while it is open). An open attaches the file to the
process's one DuckDB instance (actstore.core.attachments), which is cheap; a burst of small
reads still shares one connection (`Catalog.reading`). A lock conflict is retried for a few
seconds before it becomes a one-line error naming the writer. A catalog file that DuckDB cannot
read (truncated, overwritten) is a one-line error, never a traceback.
"""

from __future__ import annotations

import shutil
import tempfile
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext, suppress
from pathlib import Path

import duckdb

from actstore.core.attachments import ATTACHMENTS
from actstore.core.errors import ActstoreError, first_line
from actstore.core.location import store_containing
from actstore.core.views import create_views, views_hash

SCHEMA_VERSION = 12

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
        # Circuits (queries/attribution/circuits.py): circuit_id is the circuit query's id; top_n
        # is the number of top-|score| edges selected, n_edges what remains after pruning;
        # metric_value is m(C), clean/corrupted_metric the denominators' ends. The curve holds
        # every circuit the query evaluated (its search points), keyed by the circuit query.
        """CREATE TABLE circuits (
            circuit_id INTEGER PRIMARY KEY, score_id INTEGER, n_edges INTEGER,
            faithfulness DOUBLE, params VARCHAR, created_at TIMESTAMP, top_n INTEGER,
            metric VARCHAR, metric_value DOUBLE, clean_metric DOUBLE, corrupted_metric DOUBLE)""",
        """CREATE TABLE circuit_edges (
            circuit_id INTEGER, src VARCHAR, dst VARCHAR, qkv VARCHAR, score DOUBLE)""",
        """CREATE TABLE faithfulness_curve (
            circuit_id INTEGER, score_id INTEGER, n_edges INTEGER, faithfulness DOUBLE,
            top_n INTEGER, metric_value DOUBLE)""",
        # Subspace patching (queries/subspace/subspace.py): one report row per component
        # (v, row, null, full) and the patched basis, one vector per row.
        """CREATE TABLE subspace_reports (
            query_id INTEGER, run_id INTEGER, hook VARCHAR, layer INTEGER, head INTEGER,
            pos VARCHAR, mode VARCHAR, metric VARCHAR, split VARCHAR, n_prompts INTEGER,
            component VARCHAR, dim INTEGER, norm_sq DOUBLE, variance DOUBLE, value DOUBLE,
            normalized DOUBLE, effect DOUBLE, illusion BOOLEAN)""",
        """CREATE TABLE subspace_directions (
            query_id INTEGER, idx INTEGER, vector DOUBLE[])""",
        # Out-of-core reductions over prompts (queries/reduction/reduce.py): per group, position
        # and flat feature index (head for head-norm), the mean and the number of prompts behind it.
        """CREATE TABLE reductions (
            query_id INTEGER, hook VARCHAR, grp VARCHAR, pos INTEGER, idx INTEGER,
            value DOUBLE, n INTEGER)""",
    ],
    # Version 2: answer sets. A prompt's correct and incorrect answers as sets of single tokens
    # (Greater-Than: the years above the start year, and those at or below it); `answer` and
    # `wrong_answer` stay their representatives. A version-1 prompt's sets are its one answer
    # and its one wrong answer.
    [
        "ALTER TABLE prompts ADD COLUMN answers VARCHAR[]",
        "ALTER TABLE prompts ADD COLUMN wrong_answers VARCHAR[]",
        "ALTER TABLE prompts ADD COLUMN answer_tokens INTEGER[]",
        "ALTER TABLE prompts ADD COLUMN wrong_answer_tokens INTEGER[]",
        """UPDATE prompts SET answers = [answer], wrong_answers = [wrong_answer],
               answer_tokens = [answer_token], wrong_answer_tokens = [wrong_answer_token]""",
    ],
    # Version 3: the model's architecture description (actstore.model.architecture.Architecture as
    # JSON); NULL for models recorded before it existed, all of them GPT-2.
    ["ALTER TABLE models ADD COLUMN architecture VARCHAR"],
    # Version 4: token roles (actstore.core.roles). A prompt's named positions in the model's input
    # (BOS = 0): IOI's IO, S1, S2, ... and END, its final token. Runs recorded before have no
    # rows and read as END only.
    [
        """CREATE TABLE prompt_roles (
            run_id INTEGER, prompt_idx INTEGER, role VARCHAR, pos INTEGER,
            PRIMARY KEY (run_id, prompt_idx, role))""",
    ],
    # Version 5: each array's metadata document (its `zarr.json`, actstore.core.arrays), so that an
    # edited one is refused on read and restored by repair; older rows get theirs from their
    # shape, chunks and dtype as the migration runs (`fill_array_metadata`).
    ["ALTER TABLE arrays ADD COLUMN metadata VARCHAR"],
    # Version 6: path patching (queries/paths): one row per sender, receiver (its input letter
    # in qkv for heads) and role (NULL: the sender changed at every position).
    [
        """CREATE TABLE IF NOT EXISTS path_effects (
            query_id INTEGER, sender VARCHAR, receiver VARCHAR, qkv VARCHAR, role VARCHAR,
            metric VARCHAR, value DOUBLE, normalized DOUBLE)""",
    ],
    # Version 7: a position-resolved effect patched by role names the role (its `pos` is the
    # role's one position where every prompt has it there, else NULL).
    ["ALTER TABLE effects ADD COLUMN role VARCHAR"],
    # Version 8: attention by role (queries/attention): per head, the mean over prompts of the
    # attention probability from one role's position to another's, on one side.
    [
        """CREATE TABLE attention (
            query_id INTEGER, layer INTEGER, head INTEGER, from_role VARCHAR, to_role VARCHAR,
            side VARCHAR, value DOUBLE)""",
    ],
    # Version 9: head classes (queries/attention/heads.py): previous-token, duplicate-token and
    # induction scores per head, as TransformerLens' detect_head measures them.
    [
        """CREATE TABLE head_scores (
            query_id INTEGER, layer INTEGER, head INTEGER, class VARCHAR, side VARCHAR,
            value DOUBLE)""",
    ],
    # Version 10: attention interventions (queries/paths/intervene.py): per prompt and, with
    # prompt_idx NULL, for the run: the metric and accuracy before and after.
    [
        """CREATE TABLE IF NOT EXISTS interventions (
            query_id INTEGER, prompt_idx INTEGER, metric VARCHAR, value_before DOUBLE,
            value_after DOUBLE, accuracy_before DOUBLE, accuracy_after DOUBLE)""",
    ],
    # Version 11: each clean token's text as the tokenizer decodes it alone (" Mary"), so that
    # positions are labelled by token without the model (actstore.core.roles.position_labels);
    # NULL for prompts recorded before.
    ["ALTER TABLE prompts ADD COLUMN clean_token_texts VARCHAR[]"],
    # Version 12: subspace tables say what they hold as every other table does: the report's
    # patching direction (denoise or noise) is `direction`, once `mode`; the patched vectors are
    # a basis, `subspace_bases`, once `subspace_directions`. Renaming keeps every row.
    [
        "ALTER TABLE subspace_reports RENAME COLUMN mode TO direction",
        "ALTER TABLE subspace_directions RENAME TO subspace_bases",
    ],
]


# DuckDB's file: a 4 KiB main header and two 4 KiB database headers, then the blocks.
FILE_HEADER_BYTES = 3 * 4096
READ_WAIT_S = 10.0
WRITE_WAIT_S = 120.0


# What DuckDB raises for a file it cannot read or write as a database, as opposed to bad SQL.
FILE_ERRORS = (
    duckdb.IOException,
    duckdb.InternalException,
    duckdb.SerializationException,
    duckdb.FatalException,
)


def file_error(path: Path, exc: Exception) -> ActstoreError:
    """The one-line error for a catalog file that cannot be read or written."""
    text = first_line(exc)
    if "No space left" in text:
        return ActstoreError(f"disk full writing catalog {path} ({text}); free space and rerun")
    if "Permission denied" in text or "Read-only file system" in text:
        return ActstoreError(
            f"catalog {path} is not writable ({text}); writing commands need write access to "
            "the store (work on a writable copy: cp -r STORE COPY)"
        )
    return ActstoreError(
        f"catalog {path} is damaged and cannot be read ({text}); restore catalog.duckdb from a "
        "copy or backup of the store (its rows exist nowhere else)"
    )


def _is_lock_conflict(exc: Exception) -> bool:
    text = str(exc)
    return "lock" in text.lower() and ("Conflicting" in text or "Could not set lock" in text)


class Catalog:
    """The catalog file of one store."""

    def __init__(self, path: Path, holder: Callable[[], str] = lambda: "another process"):
        self.path = Path(path)
        # Set by the store's writer: this process holds the writer lock. `current` is set once
        # the schema was checked and migrated under it, which the first write does.
        self.writing = False
        self.current = False
        self.holder = holder
        self._held: dict[int, duckdb.DuckDBPyConnection] = {}  # by thread: see reading()

    def _connect(
        self, read_only: bool, config: dict[str, str] | None = None
    ) -> duckdb.DuckDBPyConnection:
        """Open the file, retrying while another process has it open: attached to the process's
        instance, or with `config` in an instance of its own (settings that hold instance-wide).

        A reader waits up to READ_WAIT_S for the writer's current transaction; the writer waits
        up to WRITE_WAIT_S for readers (a long export), so that a reader never fails an ingest.
        """
        wait_s = READ_WAIT_S if read_only else WRITE_WAIT_S
        deadline = time.monotonic() + wait_s
        delay = 0.02
        while True:
            try:
                if config is not None:
                    return duckdb.connect(str(self.path), read_only=read_only, config=config)
                return ATTACHMENTS.open(self.path, read_only)
            except duckdb.Error as exc:
                if not _is_lock_conflict(exc):
                    if isinstance(exc, FILE_ERRORS):
                        raise file_error(self.path, exc) from None
                    raise ActstoreError(
                        f"cannot open catalog {self.path}: {first_line(exc)}"
                    ) from None
                if time.monotonic() > deadline:
                    who = "a reader in another process" if self.writing else self.holder()
                    raise ActstoreError(
                        f"catalog {self.path} is held open by {who} for over {wait_s:.0f} s; "
                        "retry when it finishes, or query a copy (cp catalog.duckdb snap.duckdb)"
                    ) from None
                time.sleep(delay)
                delay = min(delay * 2, 0.25)

    def read(self) -> AbstractContextManager[duckdb.DuckDBPyConnection]:
        """A connection for reading; read-write when this process is the writer. Inside
        `reading()`, that block's connection."""
        held = self._held.get(threading.get_ident())
        return nullcontext(held) if held is not None else self._opened(read_only=not self.writing)

    @contextmanager
    def reading(self) -> Iterator[None]:
        """Serve every read of this thread inside the block from one connection.

        Each open attaches the file (a cost, and a lock other processes wait on), which a
        burst of small reads (a query's setup reads a run, its prompts and its hooks) would
        otherwise pay per statement. Hold it around reads only, never around a computation or a
        write: while it is open, a writer in another process waits for it."""
        me = threading.get_ident()
        if me in self._held:
            yield
            return
        with self._opened(read_only=not self.writing) as con:
            self._held[me] = con
            try:
                yield
            finally:
                del self._held[me]

    @contextmanager
    def sandbox(self, memory_mb: int) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-only connection that cannot reach the file system or change its settings.

        For SQL written by users: DuckDB itself refuses file readers and writers (COPY, read_csv,
        glob, ATTACH, INSTALL/LOAD, EXPORT DATABASE, also when wrapped in EXPLAIN ANALYZE), every
        write to the catalog (read-only) and any SET that would undo this. The one directory
        DuckDB still lets it use is its temporary directory (by default `catalog.duckdb.tmp/`,
        inside the store): here a fresh private one (0700) outside the store, removed on exit,
        so a statement can write only where nothing reads and nothing stays. DuckDB's working
        memory is capped at `memory_mb`; beyond it, it spills there.
        """
        scratch = Path(tempfile.mkdtemp(prefix="actstore-sql-"))
        config = {"temp_directory": str(scratch), "memory_limit": f"{int(memory_mb)}MB"}
        try:
            inside = store_containing(scratch)
            if inside is not None:
                raise ActstoreError(
                    f"the temporary directory {scratch.parent} is inside the store {inside}, "
                    "where user SQL may not write; point TMPDIR outside it"
                )
            with ATTACHMENTS.apart(self.path), self._opened_alone(config) as con:
                yield con
        finally:
            shutil.rmtree(scratch, ignore_errors=True)

    @contextmanager
    def _opened_alone(self, config: dict[str, str]) -> Iterator[duckdb.DuckDBPyConnection]:
        """Read-only in an instance of its own (its settings hold instance-wide), locked down
        before any statement of the caller runs."""
        con = self._connect(read_only=True, config=config)
        try:
            con.execute("SET enable_external_access = false")
            con.execute("SET lock_configuration = true")
            yield con
        except FILE_ERRORS as exc:
            raise file_error(self.path, exc) from None
        finally:
            con.close()

    @contextmanager
    def _opened(self, read_only: bool) -> Iterator[duckdb.DuckDBPyConnection]:
        """A connection of the process's instance, closed on exit."""
        con = self._connect(read_only=read_only)
        try:
            yield con
        except FILE_ERRORS as exc:
            raise file_error(self.path, exc) from None
        finally:
            ATTACHMENTS.close(con)

    @contextmanager
    def write(self) -> Iterator[duckdb.DuckDBPyConnection]:
        """A read-write connection inside one transaction: all of it lands or none of it.

        The first write of a writing command checks the file intact and migrates the schema in
        the same transaction, so that a command refused before it writes leaves the file as it
        was, and a command's first write costs one transaction, not two."""
        if not self.writing:
            raise RuntimeError("catalog write without the store's writer lock")
        if threading.get_ident() in self._held:
            raise RuntimeError("catalog write inside a reading() block")
        con = self._connect(read_only=False)
        try:
            con.execute("BEGIN TRANSACTION")
            try:
                if not self.current:
                    self._migrate(con)
                yield con
            except BaseException:
                with suppress(duckdb.Error):  # a failed file may refuse the rollback too
                    con.execute("ROLLBACK")
                raise
            self.commit(con)
            self.current = True
        except FILE_ERRORS as exc:
            raise file_error(self.path, exc) from None
        finally:
            ATTACHMENTS.close(con)

    def check_intact(self) -> None:
        """Refuse a catalog file that ends before the last block its tables use (truncated)."""
        with self.read() as con:
            self._check_intact(con)

    def _check_intact(self, con: duckdb.DuckDBPyConnection) -> None:
        """Writing into a truncated file would make the damage worse: checked from the tables'
        storage metadata (no data is read) before a command's first write. A file that holds
        every block DuckDB allocated holds those too: the common case costs one pragma."""
        block_size, total_blocks = con.execute(
            "SELECT block_size, total_blocks FROM pragma_database_size() "
            "WHERE database_name = current_database()"
        ).fetchall()[0]
        size = self.path.stat().st_size
        if size >= FILE_HEADER_BYTES + int(total_blocks) * int(block_size):
            return
        tables = con.execute(
            "SELECT table_name FROM information_schema.tables WHERE table_type = 'BASE TABLE' "
            "AND table_catalog = current_database()"
        ).fetchall()
        last = -1
        if tables:  # one statement: a round trip per table costs more than the check itself
            blocks = " UNION ALL ".join(
                "SELECT max(block_id) AS b FROM pragma_storage_info('{}') WHERE block_id >= 0"
                .format(table.replace("'", "''"))
                for (table,) in tables
            )  # fmt: skip
            found = con.execute(f"SELECT max(b) FROM ({blocks})").fetchall()[0][0]
            last = -1 if found is None else int(found)
        need = FILE_HEADER_BYTES + (last + 1) * int(block_size)
        if size < need:
            raise ActstoreError(
                f"catalog {self.path} is damaged and cannot be read (truncated: {size} bytes, its "
                f"tables use {need}); restore catalog.duckdb from a copy or backup of the store "
                "(its rows exist nowhere else)"
            )

    def commit(self, con: duckdb.DuckDBPyConnection) -> None:
        """End a write transaction: durable in the file itself, not only in the WAL."""
        con.execute("COMMIT")
        con.execute("CHECKPOINT")

    def version(self, con: duckdb.DuckDBPyConnection) -> int:
        value = self._meta(con, "schema_version")
        return 0 if value is None else int(value)

    @staticmethod
    def _meta(con: duckdb.DuckDBPyConnection, key: str) -> str | None:
        rows = con.execute("SELECT value FROM meta WHERE key = ?", [key]).fetchall()
        return rows[0][0] if rows else None

    def migrate(self) -> None:
        """Bring the schema to SCHEMA_VERSION (and its views up to date) in a transaction of its
        own; refuse a catalog from a newer actstore."""
        self.current = False
        with self.write():
            pass

    def _migrate(self, con: duckdb.DuckDBPyConnection) -> None:
        self._check_intact(con)
        exists = con.execute(
            "SELECT count(*) FROM information_schema.tables WHERE table_name = 'meta' "
            "AND table_catalog = current_database()"
        ).fetchall()[0][0]
        current = self.version(con) if exists else 0
        if current > SCHEMA_VERSION:
            raise ActstoreError(
                f"catalog schema version {current} is newer than this actstore supports "
                f"({SCHEMA_VERSION}); upgrade actstore"
            )
        views = views_hash()
        if current == SCHEMA_VERSION and self._meta(con, "views_hash") == views:
            return  # nothing to change: the command's transaction writes only its own rows
        for version in range(current, SCHEMA_VERSION):
            for statement in MIGRATIONS[version]:
                con.execute(statement)
        if 0 < current < 5:
            fill_array_metadata(con)
        create_views(con)
        con.executemany(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [["schema_version", str(SCHEMA_VERSION)], ["views_hash", views]],
        )

    def is_empty(self) -> bool:
        """True for a catalog file without tables: a store whose creation was interrupted."""
        with self.read() as con:
            return not con.execute(
                "SELECT count(*) FROM information_schema.tables "
                "WHERE table_catalog = current_database()"
            ).fetchall()[0][0]

    def check_version(self) -> int:
        """The catalog's schema version; refuse one that this version cannot interpret."""
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
        return current


def fill_array_metadata(con: duckdb.DuckDBPyConnection) -> None:
    """Record the metadata document of every array recorded before version 5, from the shape,
    chunks and dtype its row holds (never from the file, which may have been edited since)."""
    from actstore.core import arrays as zarrays

    rows = con.execute(
        "SELECT run_id, side, hook, shape, chunks, dtype, codec FROM arrays WHERE metadata IS NULL"
    ).fetchall()
    names = ("run_id", "side", "hook", "shape", "chunks", "dtype", "codec")
    for values in rows:
        row = dict(zip(names, values, strict=True))
        document = zarrays.expected_metadata(row)
        if document is not None:
            con.execute(
                "UPDATE arrays SET metadata = ? WHERE run_id = ? AND side = ? AND hook = ?",
                [document, row["run_id"], row["side"], row["hook"]],
            )
