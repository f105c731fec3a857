"""The store's write API: every catalog row is written here, by column name.

A `Writes` is one catalog transaction (`Store.transaction()`): what it writes lands together or
not at all. Its methods are the store's write verbs: the life of an ingest run (new, resume,
restart, batches, finish, fail, discard) with its model, and recorded queries with their result
rows (record, forget). Rows go in by name (`INSERT … BY NAME`, or an explicit column list), so a
migration that adds or reorders columns breaks no writer.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from actstore.core import arrays as zarrays
from actstore.core.errors import ActstoreError
from actstore.core.location import ArraysRoot

if TYPE_CHECKING:
    import duckdb


# The tables holding a run's data rows (its `runs` row aside).
RUN_TABLES = ("prompts", "prompt_roles", "chunks", "arrays")
# The prompts columns that hold lists of token ids.
TOKEN_LISTS = ("clean_tokens", "corrupted_tokens", "answer_tokens", "wrong_answer_tokens")
# A `prompt_roles` row without its run id.
ROLE_SCHEMA = {"prompt_idx": pl.Int32, "role": pl.String, "pos": pl.Int32}
# The column by which each result table names the query that owns its rows.
RESULT_ID = {
    "effects": "query_id",
    "edge_scores": "score_id",
    "circuits": "circuit_id",
    "circuit_edges": "circuit_id",
    "faithfulness_curve": "circuit_id",
    "subspace_reports": "query_id",
    "subspace_bases": "query_id",
    "reductions": "query_id",
    "attention": "query_id",
    "head_scores": "query_id",
    "path_effects": "query_id",
    "interventions": "query_id",
}
# Every column by which a result table refers to a query (a curve names its circuit and scores).
QUERY_ID_COLUMNS = ("query_id", "score_id", "circuit_id")
# The largest query id ever deleted (meta key): ids are never given out twice.
FORGOTTEN = "forgotten_query_id"

Rows = pl.DataFrame | Sequence[Mapping[str, Any]]


def array_records(
    store_dir: Path | ArraysRoot, run_id: int, keys: Sequence[tuple[str, str]], n_chunks: int
) -> list[dict[str, Any]]:
    """The `arrays` rows of a run's written arrays, read from their metadata and files (before
    the transaction that records them: sizing the files takes a while)."""
    root = zarrays.open_root(store_dir)
    rows = []
    for side, hook in keys:
        name = zarrays.array_name(run_id, side, hook)
        arr = root[name]
        rows.append(
            {"run_id": run_id, "side": side, "hook": hook, "shape": json.dumps(list(arr.shape)),
             "dtype": str(arr.dtype), "chunks": json.dumps(list(arr.chunks)),
             "codec": zarrays.CODEC_NAME, "raw_bytes": int(arr.nbytes),
             "stored_bytes": zarrays.stored_bytes(store_dir, name), "path": name,
             "n_chunks": n_chunks, "metadata": zarrays.metadata_document(
                 tuple(arr.shape), tuple(arr.chunks), str(arr.dtype))}
        )  # fmt: skip
    return rows


class Writes:
    """One catalog transaction of the store's writer."""

    def __init__(self, con: duckdb.DuckDBPyConnection):
        self.con = con

    # ---- rows --------------------------------------------------------------------------------

    def insert(self, table: str, rows: Rows, conflict: str = "", now: str | None = None) -> None:
        """Insert rows by column name; columns they lack stay NULL. `conflict` is "" or
        "OR REPLACE" / "OR IGNORE"; `now` names a timestamp column set to the transaction's time."""
        frame = rows if isinstance(rows, pl.DataFrame) else pl.DataFrame(list(rows))
        if frame.is_empty():
            return
        stamp = f", now() AS {now}" if now else ""
        self.con.register("incoming", frame.to_arrow())
        try:
            self.con.execute(
                f"INSERT {conflict} INTO {table} BY NAME SELECT *{stamp} FROM incoming"
            )
        finally:
            self.con.unregister("incoming")

    def next_id(self, table: str, column: str) -> int:
        sql = f"SELECT coalesce(max({column}), 0) + 1 FROM {table}"
        return int(self.con.execute(sql).fetchall()[0][0])

    def _scalar(self, sql: str, params: list[Any]) -> Any:
        rows = self.con.execute(sql, params).fetchall()
        return rows[0][0] if rows else None

    # ---- runs --------------------------------------------------------------------------------

    def latest_run(self, params_hash: str, statuses: Sequence[str]) -> int | None:
        """The newest run with these parameters in one of `statuses`."""
        marks = ", ".join("?" for _ in statuses)
        found = self._scalar(
            f"SELECT run_id FROM runs WHERE params_hash = ? AND status IN ({marks}) "
            "ORDER BY run_id DESC LIMIT 1",
            [params_hash, *statuses],
        )
        return None if found is None else int(found)

    def run_status(self, run_id: int) -> str | None:
        return self._scalar("SELECT status FROM runs WHERE run_id = ?", [run_id])

    def new_run(
        self, params: dict[str, Any], params_hash: str, n_prompts: int, seq_len: int
    ) -> int:
        """Record a new run, `ingesting`, from an ingest's parameters; returns its id."""
        run_id = self.next_id("runs", "run_id")
        run = {
            "run_id": run_id, "model": params["model"], "task": params["task"],
            "corruption": params["corruption"], "n_prompts": n_prompts, "status": "ingesting",
            "params": json.dumps(params, sort_keys=True), "params_hash": params_hash,
            "seq_len": seq_len, "dtype": params["dtype"], "batch_size": params["batch_size"],
            "seed": params["seed"], "hooks": json.dumps(params["hooks"]),
            "dataset": params.get("dataset"),
        }  # fmt: skip
        columns = ", ".join(run)
        self.con.execute(
            f"INSERT INTO runs ({columns}, created_at) VALUES "
            f"({', '.join('?' for _ in run)}, now())",
            list(run.values()),
        )
        return run_id

    def resume_run(self, run_id: int) -> None:
        """An interrupted run is being written again, keeping its recorded batches."""
        self.con.execute("UPDATE runs SET status = 'ingesting' WHERE run_id = ?", [run_id])

    def clear_run(self, run_id: int) -> None:
        """Delete a run's prompts, chunk ledger and arrays rows (its `runs` row stays)."""
        for table in RUN_TABLES:
            self.con.execute(f"DELETE FROM {table} WHERE run_id = ?", [run_id])

    def restart_run(self, run_id: int) -> None:
        """An interrupted run starts over under the same id: its rows go, its clock restarts."""
        self.clear_run(run_id)
        self.con.execute(
            "UPDATE runs SET status = 'ingesting', created_at = now(), completed_at = NULL, "
            "wall_s = NULL WHERE run_id = ?",
            [run_id],
        )

    def add_model(self, record: Mapping[str, Any]) -> None:
        """Record a model's row (actstore.model.adapter.model_record) unless the store has it."""
        self.insert("models", [record], conflict="OR IGNORE", now="created_at")

    def recorded_chunks(self, run_id: int) -> set[tuple[str, str, int]]:
        """(side, hook, chunk) of every chunk the run's ledger holds."""
        rows = self.con.execute(
            "SELECT side, hook, chunk_idx FROM chunks WHERE run_id = ?", [run_id]
        ).fetchall()
        return {(side, hook, int(c)) for side, hook, c in rows}

    def record_batches(
        self, run_id: int, prompts: Sequence[Mapping[str, Any]], ledger: Sequence[Mapping[str, Any]]
    ) -> None:
        """Whole batches' prompt rows (replacing the rows at their prompt indices) and their
        chunks' ledger rows, neither carrying the run id. A prompt row's `roles` ({role: pos})
        become its `prompt_roles` rows. One statement per table whatever the number of batches,
        so that recording many batches in one transaction costs about as much as recording one."""
        if prompts:
            roles = [
                {"prompt_idx": p["prompt_idx"], "role": name, "pos": pos}
                for p in prompts
                for name, pos in (p.get("roles") or {}).items()
            ]
            frame = pl.DataFrame([{k: v for k, v in p.items() if k != "roles"} for p in prompts])
            frame = frame.with_columns(
                pl.lit(run_id, dtype=pl.Int32).alias("run_id"),
                pl.col(*TOKEN_LISTS).cast(pl.List(pl.Int32)),
            )
            for table in ("prompts", "prompt_roles"):
                self.con.execute(
                    f"DELETE FROM {table} WHERE run_id = ? AND list_contains(?, prompt_idx)",
                    [run_id, frame["prompt_idx"].to_list()],
                )
            self.insert("prompts", frame)
            role_rows = pl.DataFrame(roles, schema=ROLE_SCHEMA)
            self.insert("prompt_roles", role_rows.with_columns(pl.lit(run_id).alias("run_id")))
        rows = pl.DataFrame(list(ledger)).with_columns(pl.lit(run_id).alias("run_id"))
        self.insert("chunks", rows, conflict="OR REPLACE", now="written_at")

    def finish_run(
        self, run_id: int, arrays: Sequence[Mapping[str, Any]], n_chunks: int, wall_s: float
    ) -> None:
        """Record the run's arrays (`array_records`) and mark it complete, once its ledger holds
        every chunk of every array."""
        have = self._scalar("SELECT count(*) FROM chunks WHERE run_id = ?", [run_id])
        if have != n_chunks * len(arrays):
            raise ActstoreError(f"run {run_id}: chunk ledger incomplete after ingest")
        self.con.execute("DELETE FROM arrays WHERE run_id = ?", [run_id])
        self.insert("arrays", arrays)
        self.con.execute(
            "UPDATE runs SET status = 'complete', completed_at = now(), "
            "wall_s = coalesce(wall_s, 0) + ? WHERE run_id = ?",
            [wall_s, run_id],
        )

    def fail_run(self, run_id: int) -> None:
        """The run stopped; it keeps its recorded batches and is resumed by rerunning."""
        self.con.execute("UPDATE runs SET status = 'failed' WHERE run_id = ?", [run_id])

    def discard_run(self, run_id: int) -> None:
        """Delete every row of a run, and the model rows no run needs any more."""
        self.clear_run(run_id)
        self.con.execute("DELETE FROM runs WHERE run_id = ?", [run_id])
        self.con.execute("DELETE FROM models WHERE model NOT IN (SELECT model FROM runs)")

    # ---- recorded queries --------------------------------------------------------------------

    def record_query(
        self,
        kind: str,
        run_id: int | None,
        params: dict[str, Any],
        params_hash: str,
        wall_s: float,
        results: dict[str, pl.DataFrame],
    ) -> int:
        """The query row and its result rows; returns the query id, which is filled into each
        result table's id column (`RESULT_ID`)."""
        unknown = sorted(set(results) - set(RESULT_ID))
        if unknown:
            raise ValueError(f"no query-id column known for result tables {unknown}")
        query_id = max(self.next_id("queries", "query_id"), self._forgotten() + 1)
        query = {"query_id": query_id, "run_id": run_id, "kind": kind,
                 "params": json.dumps(params, sort_keys=True), "params_hash": params_hash,
                 "wall_s": wall_s}  # fmt: skip
        self.insert("queries", pl.DataFrame([query], schema_overrides={"run_id": pl.Int32}),
                    now="created_at")  # fmt: skip
        for table, frame in results.items():
            self.insert(table, frame.with_columns(pl.lit(query_id).alias(RESULT_ID[table])))
        return query_id

    def set_stored_bytes(self, run_id: int, sizes: dict[tuple[str, str], int]) -> None:
        """Record the bytes a run's arrays occupy again (a repair rewrote some of their
        chunks), by (side, hook)."""
        self.con.executemany(
            "UPDATE arrays SET stored_bytes = ? WHERE run_id = ? AND side = ? AND hook = ?",
            [[size, run_id, side, hook] for (side, hook), size in sizes.items()],
        )

    def same_query_since(self, params_hash: str, after: int) -> int | None:
        """The first query with these parameters recorded after query `after`, if any."""
        rows = self.con.execute(
            "SELECT min(query_id) FROM queries WHERE params_hash = ? AND query_id > ?",
            [params_hash, after],
        ).fetchall()
        return None if rows[0][0] is None else int(rows[0][0])

    def forget_queries(self, run_ids: Sequence[int]) -> int:
        """Delete the recorded queries of runs and every result row they own (a repair: results
        computed from damaged data must not be served again). Every table with a query-id column
        is cleaned, whatever migration added it; returns how many queries were deleted."""
        if not run_ids:
            return 0
        marks = ", ".join("?" for _ in run_ids)
        ids = [r[0] for r in self.con.execute(
            f"SELECT query_id FROM queries WHERE run_id IN ({marks})", list(run_ids)
        ).fetchall()]  # fmt: skip
        if not ids:
            return 0
        id_marks = ", ".join("?" for _ in ids)
        tables = self.con.execute(
            "SELECT c.table_name, c.column_name FROM information_schema.columns c "
            "JOIN information_schema.tables t USING (table_catalog, table_schema, table_name) "
            "WHERE t.table_type = 'BASE TABLE' AND c.table_name <> 'queries' "
            "AND t.table_catalog = current_database() "
            f"AND c.column_name IN ({', '.join(repr(c) for c in QUERY_ID_COLUMNS)})"
        ).fetchall()
        for table, column in tables:
            self.con.execute(f'DELETE FROM "{table}" WHERE "{column}" IN ({id_marks})', ids)
        self.con.execute(f"DELETE FROM queries WHERE query_id IN ({id_marks})", ids)
        self.con.execute(
            "INSERT OR REPLACE INTO meta (key, value) VALUES (?, ?)",
            [FORGOTTEN, str(self._forgotten(max(ids)))],
        )
        return len(ids)

    def _forgotten(self, at_least: int = 0) -> int:
        found = self._scalar("SELECT value FROM meta WHERE key = ?", [FORGOTTEN])
        return max(at_least, int(found) if found is not None else 0)
