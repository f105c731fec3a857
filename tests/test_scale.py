"""Sharded ingest (real parallel processes) against a single-process ingest, and out-of-core
reductions through Dask against numpy, one of them under an address-space limit."""

from __future__ import annotations

import itertools
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl
import pytest
from cli_process import start_cli
from same_store import assert_same_store, single_process_store, tables

import actstore
from actstore.core import arrays as zarrays
from actstore.core.errors import ActstoreError, UsageError
from actstore.core.runtime import Runtime
from actstore.core.store import Store
from ingest.shards import parse_shard

ROOT = Path(__file__).resolve().parents[1]
ARGS = ["--model", "toy-random", "--task", "ioi", "--n", "22", "--batch-size", "4",
        "--hooks", "resid_pre"]  # fmt: skip
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}


def _cli(*args: str) -> subprocess.Popen:
    return start_cli(*args, env={"OMP_NUM_THREADS": "1"})


def _finish(proc: subprocess.Popen) -> tuple[int, str, str]:
    out, err = proc.communicate(timeout=600)
    return proc.returncode, out, err


@pytest.fixture(scope="module")
def single(tmp_path_factory, toy_random) -> Path:
    return single_process_store(tmp_path_factory, toy_random, "single", task="ioi", n=22,
                                batch_size=4, hooks="resid_pre")  # fmt: skip


def _verify_ledger(path: Path) -> int:
    """Checksum every ledger chunk against the stored values; returns the number checked. One
    catalog connection serves every chunk's read (a connection costs tens of milliseconds)."""
    store = actstore.open(path)
    with store.reading():
        rows = store._trusted_query(
            "SELECT * FROM chunks ORDER BY run_id, side, hook, chunk_idx"
        ).to_dicts()
        for row in rows:
            values = store.read(row["run_id"], row["side"], row["hook"],
                                row["prompt_start"], row["prompt_stop"])  # fmt: skip
            assert zarrays.checksum(values) == row["checksum"], row
    return len(rows)


@pytest.mark.slow
@pytest.mark.parametrize("n_shards", [2, 4])
def test_parallel_shards_merge_to_the_single_process_store(single, tmp_path, n_shards, forker):
    """The shards run at the same time, each in a process of its own forked from the session's
    forker (which has imported torch once), and so do the merges: `actstore` commands all."""
    path = tmp_path / "store"
    location = f"file://{path}" if n_shards == 2 else str(path)
    calls = itertools.count()

    def cli(*argv: str) -> tuple[int, Path]:
        output = tmp_path / f"cli{next(calls)}"
        return forker.spawn(list(argv), output), output

    def finish(call: tuple[int, Path]) -> tuple[int, str, str]:
        return forker.finish(*call)

    procs = [cli("ingest", location, *ARGS, "--shard", f"{i}/{n_shards}") for i in range(n_shards)]
    results = [finish(p) for p in procs]
    assert all(rc == 0 for rc, _, _ in results), [err for _, _, err in results]
    manifests = sorted((path / "manifests").glob("run-*/shard-*.json"))
    assert [Path(out.strip()) for _, out, _ in results] == manifests
    assert not (path / "catalog.duckdb").exists()  # shards never write the catalog

    # A merge that lacks a shard leaves the run ingesting and names the missing shard.
    last = manifests[-1]
    aside = tmp_path / last.name
    shutil.move(last, aside)
    rc, out, err = finish(cli("merge", location, "--format", "json"))
    assert rc == 1 and f"{n_shards - 1}" in err
    partial = json.loads(out)
    assert partial[0]["status"] == "ingesting" and partial[0]["missing"] == str(n_shards - 1)
    with pytest.raises(ActstoreError, match="ingesting"):
        actstore.open(path).run(1)
    shutil.move(aside, last)
    # a temporary file that a killed shard writer left: merge removes it with the staged arrays
    staged = path / "arrays.zarr" / "staged" / last.parent.name.removeprefix("run-")
    leftover = next(staged.rglob("c")) / "0.deadbeef.partial"
    leftover.write_bytes(b"half a chunk")

    rc, out, err = finish(cli("merge", location, "--format", "json"))
    assert rc == 0, err
    assert not list(path.rglob("*.partial"))
    assert json.loads(out)[0] == {
        "run_id": 1, "params_hash": json.loads(out)[0]["params_hash"], "n_shards": n_shards,
        "shards_present": n_shards, "missing": "", "status": "complete",
    }  # fmt: skip

    assert_same_store(path, single)
    merged, reference = tables(path), tables(single)
    prompts = merged["prompts"]["prompt_idx"].to_list()
    assert prompts == list(range(22))  # every prompt exactly once
    assert _verify_ledger(path) == 6 * len(reference["arrays"])  # 6 chunks of 4 prompts
    assert not (path / "arrays.zarr" / "staged" / merged["runs"]["params_hash"][0]).exists()

    # Merging again is a no-op success that reports the merged run again.
    again = finish(cli("merge", location, "--format", "json"))
    assert again[0] == 0 and json.loads(again[1]) == json.loads(out), again[2]
    assert all(tables(path)[t].equals(f) for t, f in merged.items())


def test_shard_spec_and_merge_errors(tmp_path):
    assert parse_shard("3/4").chunk_range(10) == (7, 10)
    for bad in ("4/4", "1", "a/b", "-1/2", "0/0"):
        with pytest.raises(UsageError, match="--shard"):
            parse_shard(bad)
    rc, _, err = _finish(_cli("merge", str(tmp_path)))
    assert rc == 2 and err.startswith("error: no shard manifests")


def _numpy_reduction(store, run_id, hook, by=None, norm=False):
    """Per-group, per-position means over real (unpadded) positions, in float64 numpy."""
    x = store.read(run_id, "clean", hook).astype(np.float64)
    x = np.sqrt((x**2).sum(-1)) if norm else x.reshape(*x.shape[:2], -1)
    prompts = store.prompts(run_id)
    lengths = prompts["seq_len"].to_numpy()
    labels = prompts[by].cast(pl.String).to_numpy() if by else np.array(["all"] * len(lengths))
    mask = np.arange(x.shape[1])[None, :] < lengths[:, None]
    out = {}
    for label in sorted(set(labels)):
        sel = labels == label
        total = (x[sel] * mask[sel][:, :, None]).sum(0)
        count = mask[sel].sum(0)[:, None]
        with np.errstate(invalid="ignore"):
            out[label] = np.where(count > 0, total / np.maximum(count, 1), np.nan)
    return out


def as_array(rows: pl.DataFrame) -> dict[Any, np.ndarray]:
    """Reduction rows back to one (pos, idx) array per group, NaN where no prompt contributed."""
    out: dict[Any, np.ndarray] = {}
    for (label,), part in rows.group_by(["grp"], maintain_order=True):
        grid = np.full((part["pos"].max() + 1, part["idx"].max() + 1), np.nan)
        grid[part["pos"].to_numpy(), part["idx"].to_numpy()] = part["value"].to_numpy()
        out[label] = grid
    return out


def _assert_matches(rows, expected):
    got = as_array(rows)
    assert set(got) == set(expected)
    for label, grid in expected.items():
        have = got[label]
        assert np.isnan(grid[have.shape[0] :]).all()  # positions no prompt of the group reaches
        np.testing.assert_allclose(have, grid[: have.shape[0]], rtol=1e-10, atol=1e-12)


def test_reductions_match_numpy(ioi_copy):
    store = actstore.open(ioi_copy)
    hook = "blocks.2.hook_resid_pre"  # stored (derived hooks: tests/test_derive.py)
    mean = store.reduce(1, hook, "mean")
    assert mean["n"].max() == 20 and mean["n"].min() >= 1
    _assert_matches(mean, _numpy_reduction(store, 1, hook))
    classes = store.reduce(1, hook, "class-mean", by="grp")
    _assert_matches(classes, _numpy_reduction(store, 1, hook, by="grp"))
    assert classes["grp"].n_unique() == store.prompts(1)["grp"].n_unique()
    norms = store.reduce(1, "blocks.2.attn.hook_z", "head-norm")
    assert norms["idx"].max() == 3  # one value per head
    _assert_matches(norms, _numpy_reduction(store, 1, "blocks.2.attn.hook_z", norm=True))
    again = store.reduce(1, hook, "mean")
    assert again["query_id"].unique().to_list() == mean["query_id"].unique().to_list()
    with pytest.raises(UsageError, match="per-head hook"):
        store.reduce(1, hook, "head-norm")
    with pytest.raises(UsageError, match="not a prompts column"):
        store.reduce(1, hook, "class-mean", by="nope")


def test_distributed_scheduler_matches_threads(ioi_copy):
    from distributed import LocalCluster

    store = actstore.open(ioi_copy)
    hook = "blocks.0.hook_resid_pre"  # derived (the embedding): the workers derive it
    with LocalCluster(n_workers=1, threads_per_worker=1, processes=False,
                      dashboard_address=None) as cluster:  # fmt: skip
        rows = store.reduce(1, hook, "class-mean", side="corrupted",
                            runtime=Runtime(scheduler=cluster.scheduler_address))  # fmt: skip
    from queries.reduction.reduce import _compute

    threads = _compute(store, 1, hook, "corrupted", "class-mean", "grp", Runtime())
    assert rows.drop("query_id").equals(threads.sort("grp", "pos", "idx"))


@pytest.mark.slow
def test_mean_reduction_under_a_memory_limit(tmp_path, toy_random):
    """The reduction runs with 64 MiB of address space over the warmed-up interpreter on an
    array of 93 MB, where loading the array with numpy fails. Both ingests use the session's
    model (the 9,600 forward passes are most of this test's time; loading is not needed)."""
    from ingest.runner import ingest

    path, hook, budget = tmp_path / "big", "blocks.0.mlp.hook_post", 64 * 2**20
    store = Store(path, create=True)
    ingest(store, model=toy_random, task="ioi", n=8, batch_size=8, hooks=hook)
    ingest(store, model=toy_random, task="ioi", n=4800, batch_size=96, hooks=hook)
    store = actstore.open(path)
    nbytes = store.array(2, "clean", hook).nbytes
    assert nbytes > budget * 1.3
    env = {**ENV, "MALLOC_ARENA_MAX": "2", "POLARS_MAX_THREADS": "1", "OPENBLAS_NUM_THREADS": "1"}
    proc = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "support" / "reduce_limited.py"), str(path), "2", "1",
         hook, str(budget)],
        env=env, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-2000:]
    report = json.loads(proc.stdout.strip().splitlines()[-1])
    assert report["torch"] is False and report["numpy_fits"] is False
    rows = store.query(
        "SELECT * FROM reductions WHERE query_id = (SELECT max(query_id) FROM queries) "
        "ORDER BY pos, idx"
    )
    assert rows.height == report["rows"] and rows["n"].max() == 4800
    got = as_array(rows)["all"]
    # numpy on a slice of positions and features, over all prompts, masked like the reduction
    x = store.array(2, "clean", hook)[:, :4, :64].astype(np.float64)
    lengths = store.prompts(2)["seq_len"].to_numpy()
    mask = (np.arange(4)[None, :] < lengths[:, None])[:, :, None]
    expected = (x * mask).sum(0) / mask.sum(0)
    np.testing.assert_allclose(got[:4, :64], expected, rtol=1e-10, atol=1e-12)
