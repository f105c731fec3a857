"""The store: catalog schema, chunk ledger, array round trip against TransformerLens."""

from __future__ import annotations

import json
import re

import numpy as np
import pytest
import torch
from handbuilt import version_one_store
from reading import read_hook

import actstore
from actstore.core import arrays as zarrays
from actstore.core.catalog import SCHEMA_VERSION
from actstore.core.errors import ActstoreError, UsageError
from actstore.core.store import Store

FIXED_COLUMNS = {
    "runs": [
        "run_id", "model", "task", "corruption", "n_prompts", "status", "params", "created_at",
    ],
    "prompts": [
        "run_id", "prompt_idx", "clean_text", "corrupted_text", "answer", "wrong_answer",
        "clean_logit_diff", "corrupted_logit_diff",
    ],
    "arrays": [
        "run_id", "side", "hook", "shape", "dtype", "chunks", "codec", "raw_bytes", "stored_bytes",
    ],
    "queries": ["query_id", "run_id", "kind", "params", "params_hash", "created_at", "wall_s"],
    "effects": ["query_id", "layer", "head", "pos", "metric", "value", "normalized"],
    "edge_scores": ["score_id", "run_id", "method", "src", "dst", "qkv", "score"],
    "circuits": ["circuit_id", "score_id", "n_edges", "faithfulness"],
    "prompt_roles": ["run_id", "prompt_idx", "role", "pos"],
}  # fmt: skip


def test_catalog_has_the_fixed_tables_and_columns(ioi_store):
    store = actstore.open(ioi_store)
    for table, columns in FIXED_COLUMNS.items():
        have = store.sql(f"select * from {table} limit 0").columns
        assert set(columns) <= set(have), (table, set(columns) - set(have))
    version = store.sql("select value from meta where key = 'schema_version'").item()
    assert int(version) == SCHEMA_VERSION


def test_run_row_records_all_parameters(ioi_store):
    run = actstore.open(ioi_store).run(1)
    assert run["status"] == "complete" and run["n_prompts"] == 20
    assert run["params"]["batch_size"] == 8 and run["params"]["task"] == "ioi"
    assert "blocks.0.attn.hook_z" in run["hooks"]


def test_chunk_ledger_covers_every_array_in_prompt_order(ioi_store):
    store = actstore.open(ioi_store)
    ledger = store.sql(
        "select side, hook, list(chunk_idx order by chunk_idx) as idx, "
        "list(prompt_start order by chunk_idx) as lo, list(prompt_stop order by chunk_idx) as hi "
        "from chunks where run_id = 1 group by all"
    )
    n_arrays = store.sql("select count(*) from arrays where run_id = 1").item()
    assert ledger.height == n_arrays
    for row in ledger.iter_rows(named=True):
        assert row["idx"] == [0, 1, 2] and row["lo"] == [0, 8, 16] and row["hi"] == [8, 16, 20]
    # every checksum matches the values read back
    for row in store.sql("select * from chunks where run_id = 1").iter_rows(named=True):
        values = store.read(1, row["side"], row["hook"], row["prompt_start"], row["prompt_stop"])
        assert zarrays.checksum(values) == row["checksum"]


def test_arrays_equal_run_with_cache(ioi_store, toy_random):
    store = actstore.open(ioi_store)
    prompts = store.prompts(1)
    seq = store.run(1)["seq_len"]
    tokens = torch.full((prompts.height, seq), toy_random.pad_id)
    for i, toks in enumerate(prompts["clean_tokens"].to_list()):
        tokens[i, : len(toks)] = torch.tensor(toks)
    with torch.no_grad():
        logits, cache = toy_random.run_with_cache(tokens)
    hooks = ["blocks.0.hook_resid_pre", "blocks.2.attn.hook_z", "blocks.3.hook_mlp_out",
             "blocks.1.hook_resid_mid", "blocks.3.hook_resid_post"]  # fmt: skip
    stored = set(store.hooks(1, "clean"))
    assert stored & set(hooks) and set(hooks) - stored  # hooks the run stores and derives
    for hook in hooks:
        got = read_hook(store, 1, "clean", hook, toy_random).numpy()
        np.testing.assert_allclose(got, cache[hook].numpy(), atol=1e-6, rtol=0)
    last = torch.tensor(prompts["seq_len"].to_list()) - 1
    final = logits[torch.arange(len(last)), last].numpy()
    got = read_hook(store, 1, "clean", "logits", toy_random).numpy()
    np.testing.assert_allclose(got, final, atol=1e-5)
    ans, wrong = prompts["answer_token"].to_numpy(), prompts["wrong_answer_token"].to_numpy()
    ld = final[np.arange(len(ans)), ans] - final[np.arange(len(ans)), wrong]
    np.testing.assert_allclose(prompts["clean_logit_diff"].to_numpy(), ld, atol=1e-5)


def test_float16_storage_halves_bytes_and_keeps_precision(tmp_path, toy_random):
    from ingest.runner import ingest

    ingest(Store(tmp_path / "s", create=True), model="toy-random", task="ioi", n=8, batch_size=8,
           dtype="float16", hooks="resid_pre")  # fmt: skip
    store = actstore.open(tmp_path / "s")
    arr = store.array(1, "clean", "blocks.1.hook_resid_pre")
    assert str(arr.dtype) == "float16"
    prompts = store.prompts(1)
    tokens = torch.tensor(
        [
            t + [toy_random.pad_id] * (arr.shape[1] - len(t))
            for t in prompts["clean_tokens"].to_list()
        ]
    )
    _, cache = toy_random.run_with_cache(tokens)
    ref = cache["blocks.1.hook_resid_pre"].detach().numpy()
    np.testing.assert_allclose(np.asarray(arr[:]).astype(np.float32), ref, rtol=1e-3, atol=1e-3)
    raw = store.sql("select raw_bytes from arrays where hook = 'blocks.1.hook_resid_pre' "
                    "and side = 'clean'").item()  # fmt: skip
    assert raw == 8 * arr.shape[1] * toy_random.shape.d_model * 2


def test_second_ingest_adds_a_run_without_touching_the_first(tmp_path):
    from ingest.runner import ingest

    path = tmp_path / "s"
    store = actstore.open(path, create=True)
    ingest(store, model="toy-random", task="ioi", n=8, batch_size=4, hooks="z")
    before = store.sql("select * from chunks where run_id = 1 order by side, hook, chunk_idx")
    first = store.read(1, "clean", "blocks.0.attn.hook_z")
    out = ingest(store, model="toy-random", task="ioi", n=6, batch_size=4, seed=1, hooks="z")
    assert out["run_id"].item() == 2
    assert store.sql("select list(run_id order by run_id) from runs").item().to_list() == [1, 2]
    after = store.sql("select * from chunks where run_id = 1 order by side, hook, chunk_idx")
    assert before.equals(after)
    np.testing.assert_array_equal(first, store.read(1, "clean", "blocks.0.attn.hook_z"))
    second = store.read(run=2, side="clean", hook="blocks.0.attn.hook_z", stop=3)  # as every verb
    assert second.shape[0] == 3 and store.prompts(run=2).height == 6


def test_missing_run_and_hook_are_clear_errors(ioi_store):
    store = actstore.open(ioi_store)
    with pytest.raises(UsageError, match="run 99 is not in"):
        store.run(99)
    with pytest.raises(UsageError, match="hook 'blocks.0.hook_nope' is not stored for run 1"):
        store.array(1, "clean", "blocks.0.hook_nope")


def test_not_a_store_and_newer_schema_are_refused(tmp_path, ioi_store):
    with pytest.raises(ActstoreError, match="is not an actstore store"):
        actstore.open(tmp_path)
    import shutil

    import duckdb

    copy = tmp_path / "copy"
    shutil.copytree(ioi_store, copy)
    con = duckdb.connect(str(copy / "catalog.duckdb"))
    con.execute("update meta set value = '99' where key = 'schema_version'")
    con.close()
    with pytest.raises(ActstoreError, match="schema version 99 is newer"):
        actstore.open(copy)


def test_opening_an_older_store_to_read_writes_nothing(tmp_path):
    """Reading a store an older actstore wrote leaves every byte as it was (no migration, no
    lock file): migration waits for the writer lock of a writing command."""
    from test_cli import snapshot

    path = version_one_store(tmp_path / "old")
    before = snapshot(path)
    names = sorted(p.name for p in path.iterdir())
    store = actstore.open(path)
    assert store.info()["n_prompts"].to_list() == [2]
    assert store.sql("select value from meta where key = 'schema_version'").item() == "1"
    assert store.sql("select count(*) from prompts").item() == 2
    assert snapshot(path) == before
    assert sorted(p.name for p in path.iterdir()) == names
    with store.writer("a writing command"):
        assert store.prompts(1)["answers"].to_list() == [["Mary"], ["are"]]
    assert store.sql("select value from meta where key = 'schema_version'").item() == str(
        SCHEMA_VERSION
    )


def test_a_query_on_an_older_store_migrates_it_and_records(ioi_copy):
    """The first uncached query on a store whose catalog an older actstore wrote migrates it
    (under the writer, outside the query's reads) and records its result."""
    from older import as_version

    as_version(ioi_copy, 7)
    store = actstore.open(ioi_copy)
    effects = store.patch(1, component="head")
    assert effects.height == 16 and effects["value"].is_finite().all()
    assert store.sql("select value from meta where key = 'schema_version'").item() == str(
        SCHEMA_VERSION
    )
    assert store.sql("select count(*) from queries").item() == 1


def test_stored_bytes_leave_out_a_killed_writers_partial_files(ioi_copy):
    """A chunk write killed part way leaves `*.partial` beside the chunk (zarr's temporary file
    or ours); it is not the array's, so the bytes recorded after a retried write equal an
    uninterrupted ingest's."""
    name = zarrays.array_name(1, "clean", "blocks.1.attn.hook_z")
    before = zarrays.stored_bytes(ioi_copy, name)
    assert before > 0
    chunk = next(p for p in (ioi_copy / "arrays.zarr" / name / "c").rglob("*") if p.is_file())
    chunk.with_name(chunk.name + ".3f2a.partial").write_bytes(b"x" * 1000)
    (chunk.parent / f"{chunk.name}.partial").write_bytes(b"y" * 500)
    assert zarrays.stored_bytes(ioi_copy, name) == before


def test_arrays_table_records_shapes_codec_and_bytes(ioi_store):
    store = actstore.open(ioi_store)
    row = store.sql(
        "select * from arrays where run_id = 1 and side = 'corrupted' "
        "and hook = 'blocks.1.attn.hook_z'"
    ).to_dicts()[0]
    seq = store.run(1)["seq_len"]
    assert json.loads(row["shape"]) == [20, seq, 4, 16]
    assert json.loads(row["chunks"]) == [8, seq, 4, 16]
    assert row["raw_bytes"] == 20 * seq * 4 * 16 * 4
    assert 0 < row["stored_bytes"] < row["raw_bytes"] * 1.2
    assert row["codec"] == zarrays.CODEC_NAME


def test_reads_in_a_reading_block_share_one_connection(ioi_copy, monkeypatch):
    """A burst of reads opens the catalog once; the block refuses a write; after it, another
    process can open the file for writing (the connection is closed)."""
    import subprocess
    import sys

    from actstore.core.attachments import ATTACHMENTS
    from actstore.core.store import Store

    store = Store(ioi_copy)
    opened = []
    real = ATTACHMENTS.open
    monkeypatch.setattr(ATTACHMENTS, "open", lambda *a, **k: opened.append(a) or real(*a, **k))
    store.run(1), store.prompts(1)
    assert len(opened) == 2
    with store.reading():
        run, prompts, hooks = store.run(1), store.prompts(1), store.hooks(1, "corrupted")
        with store.reading():
            assert store.runs().height == 1
    assert len(opened) == 3
    assert run["n_prompts"] == prompts.height == 20 and "tokens" in hooks
    with store.writer(), store.reading(), pytest.raises(RuntimeError, match="inside a reading"):
        with store.transaction():
            pass
    code = f"import duckdb; duckdb.connect({str(store.catalog.path)!r}).close()"
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)


def test_a_new_store_is_made_by_its_first_writer(tmp_path):
    """`create=True` checks the location and writes nothing; reading it before it is written
    fails as reading a missing store does; the first writer makes directory, catalog and
    arrays root; a store another process made meanwhile is read."""
    path = tmp_path / "parent" / "s"
    store = actstore.open(path, create=True)
    assert not store.exists and list(tmp_path.iterdir()) == []
    missing = f"{path} does not exist (no catalog.duckdb); create one with actstore ingest"
    for read in (store.runs, lambda: store.sql("select 1"), store.verify, store.repair):
        with pytest.raises(ActstoreError, match=re.escape(missing)):
            read()
    assert list(tmp_path.iterdir()) == []
    other = Store(path, create=True)
    with other.writer():
        assert sorted(p.name for p in path.iterdir()) == ["arrays.zarr", "catalog.duckdb",
                                                          "writer.lock"]  # fmt: skip
    assert other.exists and other.runs().is_empty()
    assert store.runs().is_empty() and store.exists  # made by the other Store


def test_the_ingest_stage_functions_take_a_store_not_a_path(tmp_path):
    from ingest.repair import repair
    from ingest.runner import ingest
    from ingest.shards import merge

    path = str(tmp_path / "s")
    create = "actstore.open(path, create=True) or Store(path, create=True)"
    for function, how in [(ingest, create), (merge, create),
                          (repair, "actstore.open(path) or Store(path)")]:  # fmt: skip
        with pytest.raises(UsageError) as refused:
            function(path)
        assert str(refused.value) == f"{function.__name__} takes a Store, not {path!r}: pass {how}"
    assert list(tmp_path.iterdir()) == []
