"""One writer per store, readers alongside it: tested with real, separate processes."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from test_cli import run_cli, snapshot

ROOT = Path(__file__).resolve().parent.parent
HOLD = """
import sys
from actstore.core.store import Store
with Store(sys.argv[1]).writer("actstore ingest (test holder)"):
    print("held", flush=True)
    sys.stdin.read()
"""


@pytest.fixture
def held_store(ioi_store, tmp_path):
    """A copy of the IOI store whose writer lock another process holds; yields (path, pid)."""
    copy = tmp_path / "store"
    shutil.copytree(ioi_store, copy)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(copy)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True, env=env)  # fmt: skip
    assert holder.stdout.readline().strip() == "held"
    yield copy, holder.pid
    holder.stdin.close()
    holder.wait(timeout=30)


@pytest.mark.slow
@pytest.mark.parametrize(
    "args",
    [["ingest", "{s}", "--model", "toy-random", "--task", "ioi", "--n", "4"],
     ["verify", "{s}", "--repair"]],
)  # fmt: skip
def test_second_writer_gets_one_line_naming_the_holder(held_store, args):
    path, pid = held_store
    before = snapshot(path)
    res = run_cli(*[a.format(s=path) for a in args])
    assert res.returncode == 1, res.stderr
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert f"is being written by pid {pid} on " in lines[0]
    assert "(actstore ingest (test holder), since" in lines[0]
    assert "one writer per store" in lines[0] and "Conflicting lock" not in lines[0]
    assert snapshot(path) == before


@pytest.mark.slow
def test_readers_work_while_the_writer_lock_is_held(held_store, tmp_path):
    path, _ = held_store
    res = run_cli("sql", str(path), "select count(*) as n from prompts", "--format", "csv")
    assert res.returncode == 0 and res.stdout.split() == ["n", "20"], res.stderr
    res = run_cli("info", str(path), "--format", "csv")
    assert res.returncode == 0 and "complete" in res.stdout, res.stderr
    out = tmp_path / "runs.csv"
    res = run_cli("export", str(path), "runs", "-o", str(out))
    assert res.returncode == 0 and out.read_text().startswith("run_id,"), res.stderr
    res = run_cli("verify", str(path))
    assert res.returncode == 0 and "no damage" in res.stderr, res.stderr


@pytest.mark.slow
def test_deleting_writer_lock_does_not_let_a_second_writer_in(held_store):
    """The lock is the kernel's flock on the store directory, not writer.lock's existence: with
    the file deleted (and made again by the refused writer) the holder still excludes others."""
    from actstore.core.errors import LockedError
    from actstore.core.store import Store

    path, pid = held_store
    (path / "writer.lock").unlink()
    with pytest.raises(LockedError, match="is being written by another process"):
        with Store(path).writer():
            pass
    (path / "writer.lock").unlink()
    before = snapshot(path)
    res = run_cli("verify", str(path), "--repair")
    assert res.returncode == 1 and "one writer per store" in res.stderr, res.stderr
    assert len(res.stderr.strip().splitlines()) == 1
    assert snapshot(path) == before


def test_second_store_object_in_the_same_process_is_told_so(ioi_store, tmp_path):
    from actstore.core.errors import LockedError
    from actstore.core.store import Store

    copy = tmp_path / "store"
    shutil.copytree(ioi_store, copy)
    with Store(copy).writer():
        with pytest.raises(LockedError, match="this process already holds the writer lock"):
            with Store(copy).writer():
                pass
    with Store(copy).writer():  # released on exit: the next writer gets it
        pass


# ---- the ingest's background writer thread ------------------------------------------------


def test_background_writer_writes_in_order_and_stops_at_the_first_error():
    from ingest.background import BatchWriter

    done: list[int] = []
    recorded: list[list[int]] = []

    def write(job: int) -> int:
        if job == 3:
            raise OSError("disk gone")
        done.append(job)
        return job

    writer = BatchWriter(write, recorded.append)
    for job in range(3):
        writer.submit(job)
    writer.close()
    assert done == [0, 1, 2] and writer.recorded == 3
    assert sum(recorded, []) == [0, 1, 2]  # each written batch recorded once, in order
    writer = BatchWriter(write, recorded.append)
    with pytest.raises(OSError, match="disk gone"):
        for job in range(3, 10):
            writer.submit(job)
        writer.close()
    writer.stop()
    assert done == [0, 1, 2] and writer.recorded == 0  # nothing after the failed batch


def test_background_writer_records_batches_together_while_it_is_behind():
    """While batches wait for the writer, their recording (a catalog transaction) is shared:
    fewer transactions than batches, every batch recorded once, in order."""
    import time

    from ingest.background import BatchWriter

    recorded: list[list[int]] = []

    def record(done: list[int]) -> None:
        time.sleep(0.2)  # a transaction slower than the model computes a batch
        recorded.append(done)

    writer = BatchWriter(lambda job: job, record)
    for job in range(12):
        writer.submit(job)
    writer.close()
    assert sum(recorded, []) == list(range(12)) and writer.recorded == 12
    assert len(recorded) < 12


def test_a_failed_background_write_keeps_the_batches_before_it(tmp_path, monkeypatch, toy_random):
    """A write that fails on the writer thread fails the run with the batches written before it
    recorded; rerunning resumes, and the result equals an ingest that never failed."""
    from actstore.core.errors import ActstoreError
    from actstore.core.store import Store
    from ingest import runner

    real = runner.write_chunks

    def failing(store_dir, arrays, values, chunk_idx, lo, hi):
        if chunk_idx == 2:
            raise OSError("simulated I/O error")
        return real(store_dir, arrays, values, chunk_idx, lo, hi)

    kwargs = dict(model=toy_random, task="ioi", n=20, batch_size=4, hooks="lean")
    monkeypatch.setattr(runner, "write_chunks", failing)
    with pytest.raises(ActstoreError, match="keeps 2 stored batches and is marked failed"):
        runner.ingest(Store(tmp_path / "s", create=True), **kwargs)
    store = Store(tmp_path / "s")
    assert store.run(1, complete=False)["status"] == "failed"
    assert store.query("SELECT DISTINCT chunk_idx FROM chunks ORDER BY 1")[
        "chunk_idx"
    ].to_list() == [0, 1]
    monkeypatch.setattr(runner, "write_chunks", real)
    assert runner.ingest(Store(tmp_path / "s", create=True), **kwargs)["outcome"][0] == "resumed"
    runner.ingest(Store(tmp_path / "clean", create=True), **kwargs)
    ledger = "SELECT side, hook, chunk_idx, checksum FROM chunks ORDER BY ALL"
    assert Store(tmp_path / "s").query(ledger).equals(Store(tmp_path / "clean").query(ledger))
