"""Comparing two stores: the same catalog rows (wherever their bytes are kept) and bit-identical
arrays."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

import actstore
from actstore.core.store import Store


def tables(path: Path) -> dict[str, pl.DataFrame]:
    """Every catalog row an ingest writes, less the columns that record when and how long (read
    over one catalog connection)."""
    store = actstore.open(path)
    with store.reading():
        return {
            "runs": store._trusted_query(
                "SELECT * EXCLUDE (created_at, completed_at, wall_s) FROM runs ORDER BY run_id"
            ),
            "prompts": store._trusted_query("SELECT * FROM prompts ORDER BY run_id, prompt_idx"),
            "chunks": store._trusted_query(
                "SELECT * EXCLUDE (written_at) FROM chunks ORDER BY ALL"
            ),
            "arrays": store._trusted_query("SELECT * FROM arrays ORDER BY ALL"),
            "models": store._trusted_query(
                "SELECT * EXCLUDE (created_at) FROM models ORDER BY model"
            ),
        }


def assert_same_store(path: Path, reference: Path) -> None:
    ours, theirs = tables(path), tables(reference)
    for table, frame in theirs.items():
        assert ours[table].equals(frame), table
    a, b = actstore.open(path), actstore.open(reference)
    with a.reading(), b.reading():  # each read looks its array up in the catalog
        for row in theirs["arrays"].iter_rows(named=True):
            x = a.read(row["run_id"], row["side"], row["hook"])
            y = b.read(row["run_id"], row["side"], row["hook"])
            assert x.dtype == y.dtype and np.array_equal(x, y), row["hook"]


def single_process_store(factory: Any, model: Any, name: str, **params: Any) -> Path:
    """A store ingested in this process, the reference other ways of ingesting must equal."""
    from ingest.runner import ingest

    path = factory.mktemp(name) / "store"
    ingest(Store(path, create=True), model=model, **params)
    return path
