"""Query helpers over the catalog views (actstore/views.py): a query's provenance, its ranked
heads or edges, and the latest query of a kind for a run.

Every function reads SQL and returns plain values or a polars DataFrame; nothing here loads a
model.
"""

from __future__ import annotations

import json
from typing import Any

import polars as pl

from actstore.errors import UsageError
from actstore.store import Store

HEAD_COMPONENTS = ("head", "head-pos")

ILLUSION_VERDICTS = {
    None: "not assessed (no reading map; give --reader for a residual hook)",
    True: "ILLUSION: v acts through a dormant rowspace component",
    False: "no illusion",
}


def illusion_verdict(flag: bool | None) -> str:
    """The one wording of a subspace query's illusion flag (CLI and report)."""
    return ILLUSION_VERDICTS[flag]


def provenance(store: Store, query_id: int) -> dict[str, Any]:
    """A query's row joined with its run and model: where a number came from."""
    rows = store.query(
        """
        SELECT q.query_id, q.kind, q.run_id, q.params, q.created_at, r.model, r.task,
               r.corruption, r.n_prompts, m.n_layers, m.n_heads
        FROM queries q LEFT JOIN runs r USING (run_id) LEFT JOIN models m ON m.model = r.model
        WHERE q.query_id = ?
        """,
        [query_id],
    ).to_dicts()
    if not rows:
        raise UsageError(f"query {query_id} is not in {store.path}; see: select * from queries")
    row = rows[0]
    row["params"] = json.loads(row["params"]) if row["params"] else {}
    return row


def caption(prov: dict[str, Any]) -> str:
    """One line naming a query's model, task, corruption, method or metric, and ids."""
    params = prov["params"]
    parts = [
        f"model {prov['model']}",
        f"task {prov['task']}",
        f"corruption {prov['corruption']}",
        f"{prov['n_prompts']} prompts",
    ]
    for key in ("component", "metric", "direction", "window", "method", "steps"):
        if params.get(key) is not None:
            parts.append(f"{key} {params[key]}")
    parts.append(f"run {prov['run_id']}, {prov['kind']} query {prov['query_id']}")
    return " · ".join(parts)


def top_heads(
    store: Store, query_id: int, k: int | None = None, frac: float | None = None
) -> pl.DataFrame:
    """A patching query's heads ranked by importance (the view's direction-independent column),
    cut to top-k or top-fraction."""
    where, params = _cut(k, frac)
    return store.query(
        f"SELECT * FROM top_heads WHERE query_id = ? {where} ORDER BY rank", [query_id, *params]
    )


def top_edges(
    store: Store, score_id: int, k: int | None = None, frac: float | None = None
) -> pl.DataFrame:
    """An attribution score set's edges ranked by importance (|score|), cut to top-k or
    top-fraction."""
    where, params = _cut(k, frac)
    return store.query(
        f"SELECT * FROM top_edges WHERE score_id = ? {where} ORDER BY rank", [score_id, *params]
    )


def _cut(k: int | None, frac: float | None) -> tuple[str, list[Any]]:
    if k is not None and frac is not None:
        raise UsageError("give top-k or top-fraction, not both")
    if k is not None:
        return "AND rank <= ?", [k]
    if frac is not None:
        return "AND frac_rank < ?", [frac]
    return "", []


def latest_patch_query(
    store: Store,
    run_id: int,
    component: str = "head",
    metric: str | None = None,
    direction: str | None = None,
) -> int:
    """The newest head-patching query of a run matching the filters; a one-line fix if none."""
    if component not in HEAD_COMPONENTS:
        raise UsageError(
            f"component {component!r} has no per-head effects; choose one of "
            f"{', '.join(HEAD_COMPONENTS)}"
        )
    rows = store.query(
        """
        SELECT max(query_id) FROM queries
        WHERE kind = 'patch' AND run_id = ?
          AND json_extract_string(params, '$.component') = ?
          AND (? IS NULL OR json_extract_string(params, '$.metric') = ?)
          AND (? IS NULL OR json_extract_string(params, '$.direction') = ?)
          AND query_id IN (SELECT query_id FROM effects WHERE head IS NOT NULL)
        """,
        [run_id, component, metric, metric, direction, direction],
    )
    if rows.item() is None:
        _require_run(store, run_id)
        flags = f"--component {component}"
        flags += f" --metric {metric}" if metric else ""
        flags += f" --direction {direction}" if direction else ""
        raise UsageError(
            f"run {run_id} has no {component} patching query"
            f"{_filters(metric=metric, direction=direction)}; "
            f"run actstore patch {store.path} --run {run_id} {flags}"
        )
    return int(rows.item())


def latest_score_set(store: Store, run_id: int, method: str | None = None) -> int:
    """The newest attribution score set (its score_id) of a run, optionally of one method."""
    rows = store.query(
        """
        SELECT max(q.query_id) FROM queries q
        WHERE q.kind = 'attribute' AND q.run_id = ?
          AND q.query_id IN (SELECT score_id FROM edge_scores WHERE ? IS NULL OR method = ?)
        """,
        [run_id, method, method],
    )
    if rows.item() is None:
        _require_run(store, run_id)
        raise UsageError(
            f"run {run_id} has no edge attribution scores{_filters(method=method)}; "
            f"run actstore attribute {store.path} --run {run_id} --method {method or 'eap-ig'} "
            "--level edge"
        )
    return int(rows.item())


def latest_circuit(store: Store, run_id: int, method: str | None = None) -> int:
    """The newest circuit found from a run's attribution scores."""
    rows = store.query(
        "SELECT max(circuit_id) FROM circuits_v WHERE run_id = ? AND (? IS NULL OR method = ?)",
        [run_id, method, method],
    )
    if rows.item() is None:
        _require_run(store, run_id)
        score = "ID" if method is None else f"ID (an {method} score set)"
        raise UsageError(
            f"run {run_id} has no circuit{_filters(method=method)}; run actstore circuit "
            f"{store.path} --scores {score} --edges N (score ids: select * from queries "
            f"where kind = 'attribute' and run_id = {run_id})"
        )
    return int(rows.item())


def _filters(**filters: str | None) -> str:
    given = [f"{k} {v}" for k, v in filters.items() if v is not None]
    return f" with {', '.join(given)}" if given else ""


def _require_run(store: Store, run_id: int) -> None:
    store.run(run_id, complete=False)
