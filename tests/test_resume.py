"""Crash safety: ingests killed with SIGKILL at random points resume to the same bits.

A helper process (tests/support/ingest_forker.py) loads the model once and forks one real ingest
process per attempt; the test SIGKILLs it after a seeded random delay, checks that what the
killed process left is consistent (every recorded chunk matches its checksum, prompts exactly
for the recorded batches), and reruns the same ingest until one attempt completes. The result
must verify clean and equal an uninterrupted ingest bit for bit.
"""

from __future__ import annotations

import os
import random
import signal
import time
from pathlib import Path

import polars as pl
import pytest
from ingest_forker import Forker

import actstore
from actstore.core import arrays as zarrays
from actstore.core.errors import ActstoreError
from actstore.core.store import Store
from actstore.core.verify import failures, verify

pytestmark = pytest.mark.slow

SEED = 8
KILLS = 12
N_ARRAYS = 2 * (2 + 4)  # sides x (tokens, logits, z of 4 layers); batches of 2 prompts
LEDGER = ["side", "hook", "chunk_idx", "prompt_start", "prompt_stop", "checksum", "nbytes"]


def contents(path: Path) -> dict:
    """Everything an uninterrupted ingest determines (arrays' bytes, ledger, prompts and their
    roles, run) of a store that must verify clean. The reads share one catalog connection
    (`Store.reading`)."""
    store = Store(path)
    with store.reading():
        assert failures(verify(store)).is_empty()
        out = {
            "ledger": store._trusted_query(f"SELECT {', '.join(LEDGER)} FROM chunks ORDER BY ALL"),
            "prompts": store.prompts(1),
            "roles": store._trusted_query("SELECT * FROM prompt_roles ORDER BY ALL"),
            "runs": store._trusted_query("SELECT run_id, n_prompts, status, params_hash FROM runs"),
        }
        for row in store.arrays(1).iter_rows(named=True):
            arr = store.read(1, row["side"], row["hook"])
            out[(row["side"], row["hook"])] = (arr.dtype.str, arr.shape, arr.tobytes())
    return out


def assert_same(a: dict, b: dict) -> None:
    assert a.keys() == b.keys()
    for key in a:
        if isinstance(a[key], pl.DataFrame):
            assert a[key].equals(b[key]), key
        else:
            assert a[key] == b[key], key


def assert_consistent_after_kill(path: Path) -> tuple[int, bool]:
    """What a killed ingest left: recorded chunks sound, prompts for exactly the whole batches.
    Returns the batches recorded and whether the run is complete (the kill landed after it was
    recorded complete: rerunning would start a second run). One catalog connection for all."""
    if not (path / "catalog.duckdb").exists():
        return 0, False
    try:
        store = Store(path)
    except ActstoreError as exc:  # killed while the store itself was being created
        assert "interrupted" in str(exc), exc
        return 0, False
    with store.reading():
        runs = store.runs()
        if runs.is_empty():
            return 0, False
        assert failures(verify(store)).is_empty()
        per_chunk = store._trusted_query(
            "SELECT chunk_idx, count(*) AS n FROM chunks GROUP BY 1 ORDER BY 1"
        )
        prompts = store._trusted_query("SELECT prompt_idx FROM prompts ORDER BY 1")[
            "prompt_idx"
        ].to_list()
    assert set(per_chunk["n"]) <= {N_ARRAYS}, "a batch was recorded for only some arrays"
    recorded = {i for c in per_chunk["chunk_idx"] for i in range(2 * c, 2 * c + 2)}
    assert prompts == sorted(recorded), "prompt rows differ from the recorded batches"
    return per_chunk.height, runs["status"].to_list() == ["complete"]


def test_sigkill_at_random_points_resumes_bit_for_bit(forker, tmp_path):
    rng = random.Random(SEED)
    # each kind of chain is timed on its own: one recording each batch on its own is slower, and
    # kills timed by the faster run's wall would land mostly before its first batch
    walls = {False: forker.run(tmp_path / "reference")}
    reference = contents(tmp_path / "reference")
    assert reference["runs"]["status"].to_list() == ["complete"]
    walls[True] = forker.run(tmp_path / "reference-each", record_each=True)
    assert_same(contents(tmp_path / "reference-each"), reference)
    kills, chains, batches_seen = 0, 0, set()
    # at least KILLS kills, and more chains (up to a bound) until the kills have landed at three
    # different stages: how far a run gets in a random delay depends on the machine's load
    while kills < KILLS or (len(batches_seen) < 3 and kills < 4 * KILLS):
        store = tmp_path / f"chain{chains}"
        chains += 1
        # every other chain records each batch on its own (as a model slower than the toy's
        # is), so that kills land between many recorded states; the rest record batches together
        each = chains % 2 == 1
        for attempt in range(10):
            pid = forker.start(store, record_each=each)
            if attempt < 9:  # the tenth attempt of a chain runs to the end
                time.sleep(rng.uniform(0.0, walls[each]))
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
            status, _ = forker.wait()
            if status == 0:
                break
            assert status == -signal.SIGKILL, f"ingest failed with exit {status}"
            kills += 1
            batches, complete = assert_consistent_after_kill(store)
            batches_seen.add(batches)
            if complete:  # the kill landed after the run was recorded complete
                break
        assert_same(contents(store), reference)  # which verifies it
    # the kills landed at different stages: before the store, mid-run, and late
    assert len(batches_seen) >= 3, batches_seen


BOUNDARY_N = 4  # two batches of two prompts
# Write transactions of `actstore ingest` into a new store: create the catalog, claim the run (in
# the same transaction as the schema check that opens every writing command), one per batch (each
# batch recorded on its own, as a model slower than the toy's is: "record_each"), mark it complete.
COMMITS = 1 + 1 + BOUNDARY_N // 2 + 1
# The transactions killed at, one of each kind: create, claim, the first batch (a resume then has
# a batch still to write; the second batch's commit is of the same kind), complete.
KILLED = [1, 2, 3, COMMITS]


def test_kill_at_every_catalog_transaction_boundary_leaves_one_bit_identical_run(forker, tmp_path):
    """SIGKILL before a commit of every kind, between it and its checkpoint, and after it, and
    after the last one just before the run id is printed: rerunning the command leaves exactly
    one complete run, bit-identical to an uninterrupted ingest."""
    cli = {"n": BOUNDARY_N, "cli": True, "record_each": True}
    forker.run(tmp_path / "reference", **cli, stdout=str(tmp_path / "reference.out"))
    reference = contents(tmp_path / "reference")
    stages = ("before-commit", "before-checkpoint", "after-commit")
    points = [(when, k) for k in KILLED for when in stages] + [("print", 0)]
    for when, k in points:
        store, out = tmp_path / f"{when}-{k}", tmp_path / f"{when}-{k}.out"
        forker.start(store, **cli, stdout=str(out), kill=[when, k])
        assert forker.wait()[0] == -signal.SIGKILL, f"no {when} {k}: the ingest ended first"
        assert out.read_text() == "", "a killed ingest printed a run id"
        forker.run(store, **cli, stdout=str(out))
        assert out.read_text().strip() == "1", (when, k)
        after = contents(store)  # which verifies it
        assert after["runs"].select("run_id", "status").rows() == [(1, "complete")], (when, k)
        assert_same(after, reference)
    # and those are all the boundaries: an ingest has no commit after the last one killed
    forker.run(tmp_path / "beyond", **cli, stdout=str(tmp_path / "beyond.out"),
               kill=["before-commit", COMMITS + 1])  # fmt: skip
    assert_same(contents(tmp_path / "beyond"), reference)


def kill_after_batches(forker: Forker, store: Path, batches: int) -> int:
    """An ingest that records each batch in a transaction of its own, SIGKILLed right after the
    commit of its `batches`-th (creating the store and claiming the run come first): the kill
    lands there on any machine, where one timed by a reader racing the writer may come after
    the end."""
    forker.start(store, record_each=True, kill=["after-commit", 2 + batches])
    status, _ = forker.wait()
    assert status == -signal.SIGKILL, "the ingest ended before it could be killed"
    return Store(store).query("SELECT count(*) AS n FROM chunks")["n"].item() // N_ARRAYS


def test_restart_discards_the_partial_run_and_keeps_its_id(forker, tmp_path):
    forker.run(tmp_path / "reference")
    store = tmp_path / "s"
    assert kill_after_batches(forker, store, 4) == 4
    partial = Store(store)
    assert partial.runs()["status"].to_list() == ["ingesting"]
    # damage a recorded chunk of the partial run: a restart must not reuse anything of it
    chunk = store / "arrays.zarr" / "run1" / "clean" / "logits" / "c" / "0" / "0"
    chunk.write_bytes(b"garbage")
    assert not failures(verify(partial)).is_empty()
    forker.run(store, restart=True)
    assert Store(store).runs()["run_id"].to_list() == [1]
    assert_same(contents(store), contents(tmp_path / "reference"))  # which verifies both


READERS_N = 192


def test_readers_work_between_batches_of_a_running_ingest(forker, tmp_path):
    """sql, info, export and array reads from another process while the ingest writes (96
    batches, so that a reader on a loaded machine sees several of them)."""
    store = tmp_path / "s"
    forker.start(store, n=READERS_N)
    seen: list[tuple[str, int]] = []
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        time.sleep(0.02)
        try:
            s = actstore.open(store)
            runs = s.sql("select status from runs")
        except ActstoreError:
            continue  # the store is not created yet
        if runs.is_empty():
            continue
        n = s.sql("select count(*) from prompts").item()
        if seen and seen[-1] == (runs["status"].item(), n):
            continue  # nothing new: poll again soon rather than repeat the slower reads
        assert s.info().height == 1
        s.export("chunks", fmt="csv", out=str(tmp_path / "chunks.csv"))
        for row in s.sql("select * from chunks where hook = 'logits'").iter_rows(named=True):
            values = s.read(1, row["side"], "logits", row["prompt_start"], row["prompt_stop"])
            assert zarrays.checksum(values) == row["checksum"]
        seen.append((runs["status"].item(), n))
        if seen[-1][0] == "complete":
            break
    status, _ = forker.wait()
    assert status == 0 and seen[-1] == ("complete", READERS_N), seen
    mid_run = {n for st, n in seen if st == "ingesting" and 0 < n < READERS_N}
    assert len(mid_run) >= 2, seen
