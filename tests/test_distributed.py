"""Ingest on dask.distributed (real worker processes): bit-identical to a single-process ingest,
with its own LocalCluster (`--workers 2`) or an existing one (`--scheduler`); a killed worker's
tasks are rerun, a killed coordinator is resumed by rerunning the command; bad options are one
line before anything is touched."""

from __future__ import annotations

import os
import signal
import threading
import time
from pathlib import Path

import pytest
from cli_process import run_cli
from same_store import assert_same_store, single_process_store

from actstore.core.runtime import Runtime
from actstore.core.store import Store

# Dask worker processes: the whole suite runs these, `make check` does not.
pytestmark = pytest.mark.slow

PARAMS = {"task": "ioi", "n": 16, "batch_size": 4}
LONG = {"task": "ioi", "n": 40, "batch_size": 2, "hooks": "resid_pre"}


@pytest.fixture(scope="module")
def single(tmp_path_factory, toy_random) -> Path:
    return single_process_store(tmp_path_factory, toy_random, "single", **PARAMS)


@pytest.fixture(scope="module")
def single_long(tmp_path_factory, toy_random) -> Path:
    return single_process_store(tmp_path_factory, toy_random, "single-long", **LONG)


def test_local_cluster_of_two_workers_is_bit_identical(single, tmp_path, toy_random):
    from ingest.runner import ingest

    store = Store(tmp_path / "store", create=True)
    row = ingest(store, model=toy_random, runtime=Runtime(workers=2), **PARAMS)
    assert row.select("run_id", "status", "outcome").row(0) == (1, "complete", "new")
    assert_same_store(tmp_path / "store", single)


def test_existing_cluster_is_bit_identical_and_resumes(single, tmp_path, toy_random, dask_cluster):
    from ingest.runner import ingest

    path = tmp_path / "store"
    store = Store(path, create=True)
    row = ingest(store, model=toy_random, runtime=Runtime(scheduler=dask_cluster), **PARAMS)
    assert row["outcome"].item() == "new"
    assert_same_store(path, single)
    again = ingest(store, model=toy_random, runtime=Runtime(scheduler=dask_cluster), **PARAMS)
    assert again["outcome"].item() == "existing"


def _chunks_written(path: Path) -> int:
    return len(list((path / "arrays.zarr" / "run1" / "clean" / "tokens" / "c").glob("*")))


def test_killed_worker_is_retried(single_long, tmp_path, toy_random, dask_cluster):
    import dask
    from distributed import Client

    from ingest.runner import ingest

    path = tmp_path / "store"
    result: dict = {}

    def run() -> None:
        try:
            result["row"] = ingest(
                Store(path, create=True),
                model=toy_random,
                runtime=Runtime(scheduler=dask_cluster),
                **LONG,
            )
        except BaseException as exc:  # surfaced by the assertion below
            result["error"] = exc

    with Client(dask_cluster) as client:
        pids = client.run(os.getpid)
        thread = threading.Thread(target=run)
        thread.start()
        deadline = time.monotonic() + 300
        while _chunks_written(path) < 2 and thread.is_alive() and time.monotonic() < deadline:
            time.sleep(0.05)
        assert thread.is_alive(), "the ingest ended before a worker could be killed"
        victim = sorted(pids.values())[0]
        # the nanny restarts it for later tests, forked like the others (spawned, it would
        # import torch afresh while this test waits)
        with dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}):
            os.kill(victim, signal.SIGKILL)
            thread.join(600)
            client.wait_for_workers(2, timeout=120)
        assert victim not in client.run(os.getpid).values()
    assert "error" not in result, result.get("error")
    assert result["row"]["status"].item() == "complete"
    assert_same_store(path, single_long)


def _ingest_argv(path: Path, address: str) -> list[str]:
    return ["ingest", str(path), "--model", "toy-random", "--task", "ioi", "--n", "40",
            "--batch-size", "2", "--hooks", "resid_pre", "--scheduler", address]  # fmt: skip


def test_killed_coordinator_resumes(single_long, tmp_path, dask_cluster, forker):
    """`actstore ingest` runs in processes forked from the session's forker (which has imported
    torch once); the first is SIGKILLed once 4 batches are written, the second resumes it."""
    path, killed, rerun = tmp_path / "store", tmp_path / "killed", tmp_path / "rerun"
    pid = forker.spawn(_ingest_argv(path, dask_cluster), killed)
    deadline = time.monotonic() + 300
    while _chunks_written(path) < 4 and forker.running(pid) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)
    assert forker.finish(pid, killed)[0] == -signal.SIGKILL, "the ingest ended before the kill"
    rc, out, err = forker.finish(forker.spawn(_ingest_argv(path, dask_cluster), rerun), rerun)
    assert rc == 0, err
    assert out.strip() == "1" and "resumed, complete" in err
    assert_same_store(path, single_long)


@pytest.mark.parametrize(
    "options, code, message",
    [
        (["--scheduler", "tcp://127.0.0.1:9"], 1, "no Dask scheduler answers there"),
        (["--scheduler", "tcp://127.0.0.1:notaport"], 2, "give HOST:PORT"),
        (["--workers", "0"], 2, "--workers 0: need at least 1 worker"),
        (["--workers", "2", "--shard", "0/2"], 2, "give one or the other"),
    ],
)
def test_bad_cluster_options_are_one_line(tmp_path, options, code, message):
    store = tmp_path / "store"
    started = time.monotonic()
    res = run_cli("ingest", store, "--model", "toy-random", "--task", "ioi", "--n", "4", *options,
                  timeout=120)  # fmt: skip
    assert res.returncode == code, res.stderr
    assert res.stderr.count("\n") == 1 and message in res.stderr, res.stderr
    assert not store.exists()
    assert time.monotonic() - started < 60
    assert "torch" not in res.stderr
