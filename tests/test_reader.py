"""The reader reads a run's prompts per span: what it holds and what it asks the catalog for do
not grow with the number of prompts (hand-built stores: no model, no arrays); and it reads each
stored chunk once per query (counted on an ingested store)."""

from __future__ import annotations

from collections import Counter
from itertools import islice

import numpy as np
import polars as pl
import pytest
from handbuilt import long_prompts

from actstore.core.errors import DamagedError, UsageError
from actstore.core.store import Store
from queries.core.reader import Reader, Span

SMALL, LARGE = 40, 2000  # prompts: the larger run has 50 times the rows, texts and all


def _first_span(path, n: int, monkeypatch) -> dict:
    """Open a Reader on a run of `n` long prompts and read its second span's final positions and
    answer sets: what the catalog returned to it (prompts rows, bytes) and what it holds after."""
    long_prompts(path, n)
    returned = {"prompt_rows": 0, "bytes": 0}
    trusted = Store._trusted_query

    def counted(self, sql, params=None):
        frame = trusted(self, sql, params)
        returned["bytes"] += frame.estimated_size()
        if "FROM prompts" in sql:
            returned["prompt_rows"] += frame.height
        return frame

    monkeypatch.setattr(Store, "_trusted_query", counted)
    reader = Reader(Store(path), 1, "cpu")
    span = next(islice(reader.spans(), 1, None))
    finals, sets = reader.finals(span), reader.answer_sets(span)
    return {**returned, "held": _held(vars(reader)), "n": reader.n, "finals": finals, "sets": sets}


def _held(value: object) -> int:
    """Bytes of the tables and arrays an object's state holds (through dicts, lists, tuples)."""
    if isinstance(value, pl.DataFrame):
        return value.estimated_size()
    if isinstance(value, np.ndarray):
        return value.nbytes
    if isinstance(value, dict):
        return sum(_held(v) for v in value.values())
    if isinstance(value, list | tuple):
        return sum(_held(v) for v in value)
    return 0


def test_reader_memory_does_not_grow_with_the_prompts(tmp_path, monkeypatch):
    small = _first_span(tmp_path / "small", SMALL, monkeypatch)
    large = _first_span(tmp_path / "large", LARGE, monkeypatch)
    assert (small["n"], large["n"]) == (SMALL, LARGE)  # from the run row
    for got in (small, large):  # span 1 is prompts 8..15 (ingest batches of 8)
        assert got["prompt_rows"] == 8
        assert got["finals"].tolist() == [3 + i % 3 for i in range(8, 16)]
        assert got["sets"].correct.tolist() == [[i, i + 2] for i in range(8, 16)]
        assert got["sets"].incorrect.tolist() == [[i + 1] for i in range(8, 16)]
    # Reading the whole table (texts included) returns 50 times the bytes; per span, the same.
    assert large["bytes"] == small["bytes"] < 20_000
    # What the reader keeps between spans: the current span's columns, the same for both runs.
    assert 0 < large["held"] == small["held"] < 2_000, (small["held"], large["held"])


def test_reader_reads_chosen_prompts_and_named_columns(tmp_path):
    long_prompts(tmp_path / "s", SMALL)
    reader = Reader(Store(tmp_path / "s"), 1, "cpu")
    spans = list(reader.spans(chosen=np.array([17, 3, 9, 30])))
    assert [(s.lo, s.hi, s.index.tolist()) for s in spans] == [
        (0, 8, [3]), (8, 16, [9]), (16, 24, [17]), (24, 32, [30])
    ]  # fmt: skip
    assert reader.column("answer_token", spans[2]).tolist() == [17]
    assert reader.answer_sets(spans[1]).correct.tolist() == [[9, 11]]
    assert reader.values("grp", np.array([9, 10, 14])) == ["g0", "g1", "g2"]
    with pytest.raises(UsageError, match=r"^'nope': not a prompts column; use one of prompt_idx"):
        reader.values("nope", np.array([1]))


def test_a_missing_prompt_row_is_damage_not_a_shift(tmp_path):
    store = long_prompts(tmp_path / "s", SMALL)
    with store.writer(), store.catalog.write() as con:
        con.execute("DELETE FROM prompts WHERE prompt_idx = 11")
    reader = Reader(Store(tmp_path / "s"), 1, "cpu")
    assert reader.finals(Span(0, 8)).tolist() == [3, 4, 5, 3, 4, 5, 3, 4]
    with pytest.raises(DamagedError, match=r"run 1 prompts 8\.\.15: the prompts table holds 7 of"):
        reader.finals(Span(8, 16))


def test_group_by_is_checked_against_the_catalog_before_the_model_loads(tmp_path):
    import actstore

    long_prompts(tmp_path / "s", SMALL)
    store = actstore.open(tmp_path / "s")  # model `hand` has no weights: nothing may load it
    with pytest.raises(UsageError, match=r"^--group-by nope: not a prompts column; use one of si"):
        store.subspace(1, "blocks.0.hook_resid_pre", "mean-diff", group_by="nope")


@pytest.fixture
def chunk_reads(monkeypatch) -> Counter:
    """Every verified chunk read from here on, by (array, first prompt of the chunk)."""
    import actstore.core.verified as verified

    reads: Counter = Counter()
    real = verified.read_checked

    def counted(arr, root, name, entry):
        reads[(name, entry.start)] += 1
        return real(arr, root, name, entry)

    monkeypatch.setattr(verified, "read_checked", counted)
    return reads


# Each query on run 1 of `ioi_store` (20 prompts in spans of 8), and how often it reads each chunk:
# subspace passes over the prompts twice (fitting the basis on its split, then patching).
QUERIES = {
    "patch denoise": (lambda s, m: s.patch(1, "head", direction="denoise", model=m), 1),
    "patch noise": (lambda s, m: s.patch(1, "head", direction="noise", model=m), 1),
    "patch resid": (lambda s, m: s.patch(1, "resid", direction="denoise", model=m), 1),
    "attribute": (lambda s, m: s.attribute(1, "eap"), 1),
    "path": (lambda s, m: s.path_patch(1, "a0.h0", "logits"), 1),
    "subspace": (lambda s, m: s.subspace(1, "blocks.1.hook_resid_pre", "mean-diff"), 2),
}


@pytest.mark.parametrize("query", list(QUERIES))
def test_a_query_reads_each_chunk_once_per_pass(ioi_copy, toy_random, chunk_reads, query):
    """A chunk that a derivation reads (the corrupted logits from the final residual, a residual
    from z) is not fetched and verified again when the query reads the same hook of the span:
    each (side, hook) chunk is read once per pass over the prompts, on both sides."""
    import actstore

    run, passes = QUERIES[query]
    run(actstore.open(ioi_copy), toy_random)
    assert chunk_reads, "the query read no chunk"
    sides = {name.split("/")[1] for name, _ in chunk_reads}
    assert sides == {"clean", "corrupted"}, chunk_reads
    assert {start for _, start in chunk_reads} == {0, 8, 16}, chunk_reads
    assert set(chunk_reads.values()) == {passes}, chunk_reads
