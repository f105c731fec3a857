"""A background thread that writes ingest batches while the model computes the next one.

Compression, checksums, fsync and the catalog transaction of batch b overlap the forward passes
of batch b+1 (blosc, hashing and file I/O release the GIL). Batches are written in the order
given, each exactly as without the thread (chunks durable, then its ledger rows in one
transaction), so what a killed ingest leaves is the same. At most one batch waits while one is
written: memory stays at two batches.
"""

from __future__ import annotations

import queue
import threading
from collections.abc import Callable
from typing import Any


class BatchWriter:
    """Runs `write(job)` for each submitted job, in order, on one thread."""

    def __init__(self, write: Callable[[Any], None]):
        self.write = write
        self.jobs: queue.Queue[Any] = queue.Queue(maxsize=1)
        self.error: BaseException | None = None
        self.written = 0
        self.thread = threading.Thread(target=self._loop, name="ingest-writer", daemon=True)
        self.thread.start()

    def _loop(self) -> None:
        while True:
            job = self.jobs.get()
            if job is None:
                return
            if self.error is not None:
                continue  # a failed write stops the run: later batches are not written
            try:
                self.write(job)
                self.written += 1
            except BaseException as exc:  # handed to the caller's thread by submit / close
                self.error = exc

    def submit(self, job: Any) -> None:
        """Queue a batch (waiting while one is queued); raises an earlier write's error."""
        self._raise()
        self.jobs.put(job)

    def close(self) -> None:
        """Wait until every submitted batch is written; raises a write's error."""
        self.stop()
        self._raise()

    def stop(self) -> None:
        """Let the batch being written finish, drop none that wait, and end the thread."""
        if self.thread.is_alive():
            self.jobs.put(None)
            self.thread.join()

    def _raise(self) -> None:
        if self.error is not None:
            raise self.error
