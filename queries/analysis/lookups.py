"""Query helpers over the catalog views (actstore/core/views.py): a query's provenance and its
ranked heads or edges.

Every function reads SQL and returns plain values or a polars DataFrame; nothing here loads a
model.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from actstore.core.errors import UsageError
from actstore.core.store import Store

ILLUSION_VERDICTS = {
    None: "not assessed (no reading map; give --reader for a residual hook)",
    True: "ILLUSION: v acts through a dormant rowspace component",
    False: "no illusion",
}


def illusion_verdict(flag: bool | None) -> str:
    """The one wording of a subspace query's illusion flag (CLI and report)."""
    return ILLUSION_VERDICTS[flag]


# What a caption names of a query's setting: query_params' typed columns, by the option names.
CAPTIONED = {"component": "component", "metric": "metric", "direction": "direction",
             "window": "window_size", "method": "method", "steps": "steps"}  # fmt: skip


def provenance(store: Store, query_id: int) -> dict[str, Any]:
    """A query's row joined with its run and model, and its parameters as the typed columns of
    the view query_params (actstore/core/views.py): where a number came from."""
    rows = store._trusted_query(
        """
        SELECT q.query_id, q.kind, q.run_id, q.created_at, r.model, r.task,
               r.corruption, r.n_prompts, m.n_layers, m.n_heads,
               qp.component, qp.metric, qp.direction, qp.window_size, qp.method, qp.steps,
               qp.level, qp.score_id, qp.roles
        FROM queries q JOIN query_params qp USING (query_id)
             LEFT JOIN runs r ON r.run_id = q.run_id LEFT JOIN models m ON m.model = r.model
        WHERE q.query_id = ?
        """,
        [query_id],
    ).to_dicts()
    if not rows:
        raise UsageError(f"query {query_id} is not in {store.path}; see: select * from queries")
    return rows[0]


def asked_roles(prov: dict[str, Any]) -> list[str]:
    """The roles a patching query was asked for, in the order asked (none: by position)."""
    return prov["roles"].split(",") if prov.get("roles") else []


def caption(prov: dict[str, Any]) -> str:
    """One line naming a query's model, task, corruption, method or metric, and ids."""
    parts = [
        f"model {prov['model']}",
        f"task {prov['task']}",
        f"corruption {prov['corruption']}",
        f"{prov['n_prompts']} prompts",
    ]
    for name, column in CAPTIONED.items():
        if prov.get(column) is not None:
            parts.append(f"{name} {prov[column]}")
    parts.append(f"run {prov['run_id']}, {prov['kind']} query {prov['query_id']}")
    return " · ".join(parts)


def top_heads(
    store: Store, query_id: int, k: int | None = None, frac: float | None = None
) -> pl.DataFrame:
    """A patching query's heads ranked by importance (the view's direction-independent column),
    cut to top-k or top-fraction."""
    where, params = _cut(k, frac)
    return store._trusted_query(
        f"SELECT * FROM top_heads WHERE query_id = ? {where} ORDER BY rank", [query_id, *params]
    )


def top_edges(
    store: Store, score_id: int, k: int | None = None, frac: float | None = None
) -> pl.DataFrame:
    """An attribution score set's edges ranked by importance (|score|), cut to top-k or
    top-fraction."""
    where, params = _cut(k, frac)
    return store._trusted_query(
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
