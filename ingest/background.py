"""A background thread that writes ingest batches while the model computes the next one.

Compression, checksums, fsync and the catalog transaction of batch b overlap the forward passes
of batch b+1 (blosc, hashing and file I/O release the GIL). Batches are written in the order
given, each exactly as without the thread (its chunks durable before its ledger rows are
recorded), so a killed ingest leaves only whole batches recorded. At most one batch waits while
one is written: memory stays at two batches.

Recording is one catalog transaction (open, commit, checkpoint, close), which for a small model
costs more than computing a batch. So written batches are recorded together, at most
RECORD_EVERY_S after the previous recording: each at once when batches take longer than that.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable
from typing import Any

RECORD_EVERY_S = 0.5
_NO_BATCH = object()  # what the queue gives when no batch came in time


class BatchWriter:
    """Runs `write(job)` for each submitted job, in order, on one thread, and `record` on the
    list of what the writes returned since the last recording."""

    def __init__(self, write: Callable[[Any], Any], record: Callable[[list[Any]], None]):
        self.write, self.record = write, record
        self.jobs: queue.Queue[Any] = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.recorded = 0
        self.thread = threading.Thread(target=self._loop, name="ingest-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        pending: list[Any] = []  # written, not yet recorded
        last = time.monotonic()
        done = False
        while not done:
            wait = max(0.0, last + RECORD_EVERY_S - time.monotonic()) if pending else None
            try:
                job = self.jobs.get(timeout=wait)
            except queue.Empty:  # no batch came in time: record the written ones now
                job = _NO_BATCH
            done = job is None
            if self.error is not None:
                continue  # a failed write stops the run: later batches are not written
            if job is not None and job is not _NO_BATCH:
                try:
                    pending.append(self.write(job))
                except BaseException as exc:  # handed to the caller's thread by submit / close
                    self.error = exc
            due = time.monotonic() - last >= RECORD_EVERY_S
            if pending and (done or due or self.error is not None):
                try:  # after a failed write, the batches written before it are still recorded
                    self.record(pending)
                    self.recorded += len(pending)
                except BaseException as exc:
                    self.error = self.error or exc
                pending, last = [], time.monotonic()

    def submit(self, job: Any) -> None:
        """Queue a batch (waiting while one is queued); raises an earlier write's error."""
        self._raise()
        self.jobs.put(job)

    def close(self) -> None:
        """Wait until every submitted batch is written and recorded; raises a write's error."""
        self.stop()
        self._raise()

    def stop(self) -> None:
        """Let the batches written or waiting finish, and end the thread."""
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error
