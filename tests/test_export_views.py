"""Exports of tables, views and queries round-trip through polars in every file format."""

from __future__ import annotations

import polars as pl
import pytest
from click.testing import CliRunner

from actstore.app.cli import main
from actstore.core.errors import UsageError
from actstore.core.output import FILE_FORMATS
from actstore.core.store import Store
from actstore.core.views import VIEWS

READERS = {
    "csv": pl.read_csv,
    "parquet": pl.read_parquet,
    "json": pl.read_json,
    "jsonl": pl.read_ndjson,
}


def read_back(path, fmt: str, schema: pl.Schema) -> pl.DataFrame:
    """Text formats carry no types: read them with the exported frame's schema."""
    if fmt == "parquet":
        return pl.read_parquet(path)
    return READERS[fmt](path, schema=schema)


@pytest.fixture(scope="module")
def every_view_store(hand_store, tmp_path_factory):
    """The hand store with rows for every view: path, attention, head-class and two score sets
    of one run added to a copy."""
    import shutil

    import handbuilt

    path = shutil.copytree(hand_store[0], tmp_path_factory.mktemp("views") / "store")
    handbuilt.add_path_attention_and_exact(Store(path))
    return path


@pytest.mark.parametrize("fmt", FILE_FORMATS)
@pytest.mark.parametrize("name", ["effects", "edge_scores", "queries", *VIEWS])
def test_table_and_view_round_trip(every_view_store, tmp_path, name, fmt):
    store = Store(every_view_store)
    out = tmp_path / f"{name}.{fmt}"
    df = store.export(table=name, fmt=fmt, out=str(out))
    assert df.height > 0
    back = read_back(out, fmt, df.schema)
    assert back.schema == df.schema
    assert back.equals(df), f"{name} as {fmt} did not round-trip"
    assert df.equals(store.sql(f"SELECT * FROM {name}"))  # views have a fixed order


@pytest.mark.parametrize("fmt", FILE_FORMATS)
def test_query_round_trip_from_cli(hand_store, tmp_path, fmt):
    path, _ = hand_store
    out = tmp_path / f"q.{fmt}"
    sql = "select task, node, normalized, rank from top_heads where rank <= 3 order by task, rank"
    res = CliRunner().invoke(
        main, ["export", str(path), "--sql", sql, "--format", fmt, "-o", str(out)]
    )
    assert res.exit_code == 0, res.output
    expected = Store(path).sql(sql)
    assert expected.height == 9  # three queries (runs 1, 2, 4) x top 3
    assert read_back(out, fmt, expected.schema).equals(expected)


def test_unknown_name_lists_views(hand_store):
    with pytest.raises(UsageError, match="top_heads"):
        Store(hand_store[0]).export(table="nope", fmt="csv", out="-")
