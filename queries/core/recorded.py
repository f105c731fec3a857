"""A recorded query, asked once: find an equal earlier query, else compute, record and read back.

Every query that writes results goes through `recorded`, so all of them answer a repeated
question from the catalog (before a model is loaded or torch imported), refuse a store they
cannot write before computing, and return the rows as stored.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import polars as pl

from actstore.core.results import find_query, latest_query_id, record_query
from actstore.core.store import Store


def recorded(
    store: Store,
    kind: str,
    run: int | None,
    params: dict[str, Any],
    compute: Callable[[], dict[str, pl.DataFrame]],
    read: Callable[[int], pl.DataFrame],
    recompute: bool = False,
) -> pl.DataFrame:
    """`read(query_id)` of the query (kind, run, params): found in the catalog unless
    `recompute`, else `compute()`'s result tables recorded with its wall time."""
    # not inside one reading() block: an uncached query checks that it can write, which
    # migrates a catalog of an older schema first, and a write cannot run inside a read
    latest = latest_query_id(store)  # before the look: whatever is recorded later is newer
    found = find_query(store, kind, run, params, recompute)
    if found is not None:
        return read(found)
    # A read-only store, or an ingest holding the writer lock, fails here at once rather than
    # after the computation; an older catalog migrates here, outside the reads above.
    store.check_writable()
    started = time.perf_counter()
    results = compute()
    query_id = record_query(store, kind, run, params, time.perf_counter() - started, results,
                            after=latest)  # fmt: skip
    return read(query_id)
