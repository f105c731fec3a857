"""Recorded queries: every computation over a run is a `queries` row plus its result rows.

Result tables carry the query's id in their first column (`effects.query_id`,
`edge_scores.score_id`, `circuits.score_id`, …). A query asked again with equal parameters is
answered from the catalog without loading a model or importing torch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import polars as pl

from actstore.store import Store


def params_hash(kind: str, run_id: int | None, params: dict[str, Any]) -> str:
    """Stable digest of what determines a query's result."""
    blob = json.dumps({"kind": kind, "run_id": run_id, "params": params}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


# Columns by which a result table names the query that owns its rows.
QUERY_ID_COLUMNS = ("query_id", "score_id", "circuit_id")
# The largest query id ever deleted (meta key): ids are never given out twice.
FORGOTTEN = "forgotten_query_id"


def find_query(
    store: Store,
    kind: str,
    run_id: int | None,
    params: dict[str, Any],
    recompute: bool = False,
) -> int | None:
    """The id of an earlier query with the same kind, run and parameters, if any (never with
    `recompute`).

    None means the caller computes and records the result, so the store must be writable: a
    read-only store, or an ingest holding the writer lock, fails here at once rather than after
    the computation.
    """
    if not recompute:
        rows = store.query(
            "SELECT query_id FROM queries WHERE params_hash = ? ORDER BY query_id DESC LIMIT 1",
            [params_hash(kind, run_id, params)],
        )
        if rows.height:
            return int(rows.item())
    store.check_writable()
    return None


def forget_queries(con: Any, run_ids: list[int]) -> int:
    """Delete the recorded queries of runs and every result row they own, inside the caller's
    transaction (a repair: results computed from the damaged data must not be served again).
    Every table with a query-id column is cleaned, whatever migration added it; returns how
    many queries were deleted."""
    if not run_ids:
        return 0
    marks = ", ".join("?" for _ in run_ids)
    ids = [r[0] for r in con.execute(
        f"SELECT query_id FROM queries WHERE run_id IN ({marks})", run_ids
    ).fetchall()]  # fmt: skip
    if not ids:
        return 0
    id_marks = ", ".join("?" for _ in ids)
    tables = con.execute(
        "SELECT c.table_name, c.column_name FROM information_schema.columns c "
        "JOIN information_schema.tables t USING (table_schema, table_name) "
        "WHERE t.table_type = 'BASE TABLE' AND c.table_name <> 'queries' "
        f"AND c.column_name IN ({', '.join(repr(c) for c in QUERY_ID_COLUMNS)})"
    ).fetchall()
    for table, column in tables:
        con.execute(f'DELETE FROM "{table}" WHERE "{column}" IN ({id_marks})', ids)
    con.execute(f"DELETE FROM queries WHERE query_id IN ({id_marks})", ids)
    con.execute(
        "INSERT OR REPLACE INTO meta VALUES (?, ?)", [FORGOTTEN, str(_forgotten(con, max(ids)))]
    )
    return len(ids)


def _forgotten(con: Any, at_least: int = 0) -> int:
    rows = con.execute("SELECT value FROM meta WHERE key = ?", [FORGOTTEN]).fetchall()
    return max(at_least, int(rows[0][0]) if rows else 0)


def _next_query_id(store: Store, con: Any) -> int:
    """The next query id: after every recorded one, and after every deleted one."""
    return max(store.next_id(con, "queries", "query_id"), _forgotten(con) + 1)


def record_query(
    store: Store,
    kind: str,
    run_id: int | None,
    params: dict[str, Any],
    wall_s: float,
    results: dict[str, pl.DataFrame],
) -> int:
    """Insert the query row and its result rows in one transaction; returns the query id.

    `results` maps a table name to rows whose first column (the id) is filled in here; the
    frame's other columns must be the table's remaining columns, in order.
    """
    with store.writer(), store.catalog.write() as con:
        query_id = _next_query_id(store, con)
        con.execute(
            "INSERT INTO queries VALUES (?, ?, ?, ?, ?, now(), ?)",
            [query_id, run_id, kind, json.dumps(params, sort_keys=True),
             params_hash(kind, run_id, params), wall_s],
        )  # fmt: skip
        for table, frame in results.items():
            id_column = con.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_name = ? "
                "ORDER BY ordinal_position LIMIT 1",
                [table],
            ).fetchall()[0][0]
            rows = frame.with_columns(pl.lit(query_id).alias(id_column)).select(
                [id_column, *[c for c in frame.columns if c != id_column]]
            )
            con.register("incoming", rows.to_arrow())
            con.execute(f"INSERT INTO {table} SELECT * FROM incoming")
            con.unregister("incoming")
    return query_id


def query_params(store: Store, query_id: int) -> dict[str, Any]:
    """A recorded query's row, parameters decoded."""
    rows = store.query("SELECT * FROM queries WHERE query_id = ?", [query_id]).to_dicts()
    if not rows:
        from actstore.errors import UsageError

        raise UsageError(f"query {query_id} is not in {store.path}; see: select * from queries")
    row = rows[0]
    row["params"] = json.loads(row["params"])
    return row
