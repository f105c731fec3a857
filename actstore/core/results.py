"""Recorded queries: every computation over a run is a `queries` row plus its result rows.

Result tables carry the query's id in a column of their own (`effects.query_id`,
`edge_scores.score_id`, `circuits.circuit_id`, …; actstore.core.writes.RESULT_ID). A query asked
again with equal parameters is answered from the catalog without loading a model or importing
torch.
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

import polars as pl

from actstore.core.store import Store
from actstore.core.views import LEGACY_KEYS


def params_hash(kind: str, run_id: int | None, params: dict[str, Any]) -> str:
    """Stable digest of what determines a query's result: a query's identity, taken under the
    names its parameters had when the kind was first recorded (views.LEGACY_KEYS), so that a
    renamed parameter leaves the store's earlier queries found and superseded."""
    old = LEGACY_KEYS.get(kind, {})
    named = {old.get(key, key): value for key, value in params.items()}
    blob = json.dumps({"kind": kind, "run_id": run_id, "params": named}, sort_keys=True)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


def find_query(
    store: Store,
    kind: str,
    run_id: int | None,
    params: dict[str, Any],
    recompute: bool = False,
) -> int | None:
    """The id of an earlier query with the same kind, run and parameters, if any (never with
    `recompute`). None means the caller computes and records the result: it checks first that
    the store is writable (`Store.check_writable`)."""
    if not recompute:
        rows = store._trusted_query(
            "SELECT query_id FROM queries WHERE params_hash = ? ORDER BY query_id DESC LIMIT 1",
            [params_hash(kind, run_id, params)],
        )
        if rows.height:
            return int(rows.item())
    return None


def latest_query_id(store: Store) -> int:
    """The largest query id recorded so far (0 for none): ids only grow, so a query recorded
    after this call has a larger one."""
    sql = "SELECT coalesce(max(query_id), 0) AS q FROM queries"
    return int(store._trusted_query(sql)["q"].item())


def record_query(
    store: Store,
    kind: str,
    run_id: int | None,
    params: dict[str, Any],
    wall_s: float,
    results: dict[str, pl.DataFrame],
    after: int | None = None,
) -> int:
    """Insert the query row and its result rows in one transaction; returns the query id.

    `results` maps a result table to rows named by its columns, the query's id column left
    out: it is filled in here. With `after` (the latest query id when this one was found
    missing), an equal query recorded since then by another process is reused instead: the same
    question asked twice at once is recorded once.
    """
    digest = params_hash(kind, run_id, params)
    with store.transaction() as tx:
        if after is not None:
            same = tx.same_query_since(digest, after)
            if same is not None:
                return same
        return tx.record_query(kind, run_id, params, digest, wall_s, results)


def query_params(store: Store, query_id: int) -> dict[str, Any]:
    """A recorded query's row, parameters decoded."""
    rows = store._trusted_query("SELECT * FROM queries WHERE query_id = ?", [query_id]).to_dicts()
    if not rows:
        from actstore.core.errors import UsageError

        raise UsageError(f"query {query_id} is not in {store.path}; see: select * from queries")
    row = rows[0]
    row["params"] = json.loads(row["params"])
    return row
