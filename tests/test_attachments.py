"""The process's one DuckDB instance with catalog files attached to it: locking as seen from
other processes, one attachment per file, and recovery from files that are not databases."""

from __future__ import annotations

import multiprocessing
import subprocess
import sys
from pathlib import Path

import duckdb
import pytest

from actstore.core.attachments import ATTACHMENTS


def _catalog(path: Path) -> Path:
    con = duckdb.connect(str(path))
    con.execute("CREATE TABLE t AS SELECT range AS a FROM range(5)")
    con.execute("CREATE VIEW v AS SELECT sum(a) AS s FROM t")
    con.close()
    return path


def _other_process_can_write(path: Path) -> bool:
    code = f"import duckdb; duckdb.connect({str(path)!r}).close()"
    return subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0


def test_a_file_stays_locked_until_its_last_connection_closes(tmp_path):
    path = _catalog(tmp_path / "c.duckdb")
    outer = ATTACHMENTS.open(path, read_only=True)
    inner = ATTACHMENTS.open(path, read_only=True)
    assert inner.execute("SELECT s FROM v").fetchall() == [(10,)]
    ATTACHMENTS.close(inner)
    assert not _other_process_can_write(path)
    assert outer.execute("SELECT count(*) FROM t").fetchall() == [(5,)]
    ATTACHMENTS.close(outer)
    assert _other_process_can_write(path)


def test_the_other_mode_is_refused_while_the_file_is_held(tmp_path):
    path = _catalog(tmp_path / "c.duckdb")
    con = ATTACHMENTS.open(path, read_only=True)
    with pytest.raises(duckdb.ConnectionException, match="holds the file read-only"):
        ATTACHMENTS.open(path, read_only=False)
    ATTACHMENTS.close(con)
    con = ATTACHMENTS.open(path, read_only=False)
    con.execute("INSERT INTO t VALUES (5)")
    ATTACHMENTS.close(con)
    con = ATTACHMENTS.open(path, read_only=True)
    assert con.execute("SELECT s FROM v").fetchall() == [(15,)]
    ATTACHMENTS.close(con)


def test_a_file_that_is_not_a_database_leaves_the_instance_usable(tmp_path):
    bad = tmp_path / "bad.duckdb"
    bad.write_bytes(b"not a database" * 1000)
    with pytest.raises(duckdb.Error):
        ATTACHMENTS.open(bad, read_only=True)
    con = ATTACHMENTS.open(_catalog(tmp_path / "c.duckdb"), read_only=True)
    assert con.execute("SELECT s FROM v").fetchall() == [(10,)]
    ATTACHMENTS.close(con)


def _read_in_child(path: str, queue: multiprocessing.Queue) -> None:
    con = ATTACHMENTS.open(Path(path), read_only=True)
    queue.put(con.execute("SELECT s FROM v").fetchall())
    ATTACHMENTS.close(con)


def test_a_forked_child_reads_through_an_instance_of_its_own(tmp_path):
    path = _catalog(tmp_path / "c.duckdb")
    con = ATTACHMENTS.open(path, read_only=True)
    con.execute("SELECT 1").fetchall()
    ATTACHMENTS.close(con)
    context = multiprocessing.get_context("fork")
    queue = context.Queue()
    child = context.Process(target=_read_in_child, args=(str(path), queue))
    child.start()
    child.join(60)
    assert child.exitcode == 0 and queue.get(timeout=5) == [(10,)]


def test_a_sandbox_waits_for_other_threads_and_refuses_inside_a_read(tmp_path):
    """The sandbox's instance of its own never shares the file with this process's attachment:
    it waits for another thread's read to end, and a read inside it (or it inside a read on the
    same thread) is refused rather than left to drop the other's lock."""
    import threading
    import time

    from actstore.core.catalog import Catalog

    path = _catalog(tmp_path / "c.duckdb")
    catalog = Catalog(path)
    reading = threading.Event()
    order: list[str] = []

    def read() -> None:
        with catalog.read() as con:
            reading.set()
            time.sleep(0.3)
            order.append("read done")
            con.execute("SELECT 1").fetchall()

    reader = threading.Thread(target=read)
    reader.start()
    reading.wait(10)
    with catalog.sandbox(memory_mb=256) as con:
        order.append("sandbox")
        assert con.execute("SELECT s FROM v").fetchall() == [(10,)]
        with pytest.raises(RuntimeError, match="inside its own sandboxed connection"):
            catalog.check_intact()
    reader.join(10)
    assert order == ["read done", "sandbox"]
    with catalog.read(), pytest.raises(RuntimeError, match="while this thread has it open"):
        with catalog.sandbox(memory_mb=256):
            pass
    assert _other_process_can_write(path)
