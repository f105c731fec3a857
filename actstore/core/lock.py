"""The store's single-writer lock: an exclusive flock on the store directory itself, with
STORE/writer.lock naming its holder.

DuckDB's own file lock would refuse a second writer with a raw message; this lock is taken first
so that the refusal names the process that holds the store and what it is doing. The lock is on
the directory, which the kernel holds for as long as the holder lives: a lock on writer.lock
would be a lock on one inode, and deleting that file would let a second writer lock a new one.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import sys
import time
from pathlib import Path

from actstore.core.errors import ActstoreError, LockedError


def describe_holder(lock_path: Path) -> str:
    """Who holds the lock, from the record its holder wrote: pid, host, command, since."""
    try:
        info = json.loads(Path(lock_path).read_text() or "{}")
    except (OSError, ValueError):
        return "another process"
    if not info:
        return "another process"
    since = time.strftime("%H:%M:%S", time.localtime(info.get("since", 0)))
    return f"pid {info.get('pid')} on {info.get('host')} ({info.get('command')}, since {since})"


def _holder_pid(lock_path: Path) -> int | None:
    try:
        return int(json.loads(Path(lock_path).read_text() or "{}").get("pid"))
    except (OSError, ValueError, TypeError):
        return None


class WriterLock:
    """Held for the whole of a writing command; released on exit, also when the process dies."""

    def __init__(self, store_dir: Path):
        self.path = Path(store_dir) / "writer.lock"
        self._fd: int | None = None
        self._dir_fd: int | None = None

    @property
    def held(self) -> bool:
        return self._fd is not None

    def acquire(self, command: str | None = None, wait_s: float = 0.0) -> None:
        """Take the lock, or raise LockedError naming the holder; with `wait_s`, first wait
        that long for another process's writer to finish (a short write, such as a query's
        recording, waits for another's)."""
        deadline = time.monotonic() + wait_s
        while True:
            try:
                return self._acquire(command)
            except LockedError:
                if time.monotonic() >= deadline or _holder_pid(self.path) == os.getpid():
                    raise
            time.sleep(0.05)

    def _acquire(self, command: str | None) -> None:
        try:
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as exc:
            raise ActstoreError(
                f"store {self.path.parent} is not writable ({exc.strerror}); writing commands "
                "need write access to the store (work on a writable copy: cp -r STORE COPY)"
            ) from None
        dir_fd = os.open(self.path.parent, os.O_RDONLY | os.O_DIRECTORY)
        try:
            fcntl.flock(dir_fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            os.close(dir_fd)
            if _holder_pid(self.path) == os.getpid():
                raise LockedError(
                    f"this process already holds the writer lock of {self.path.parent} through "
                    "another Store object; write through that one"
                ) from None
            raise LockedError(
                f"store {self.path.parent} is being written by {describe_holder(self.path)}; "
                "wait for it to finish (one writer per store)"
            ) from None
        record = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "command": command or " ".join(["actstore", *sys.argv[1:]])[:120],
            "since": time.time(),
        }
        os.ftruncate(fd, 0)
        os.write(fd, json.dumps(record).encode())
        self._fd, self._dir_fd = fd, dir_fd

    def release(self) -> None:
        if self._fd is None or self._dir_fd is None:
            return
        os.ftruncate(self._fd, 0)
        os.close(self._fd)
        fcntl.flock(self._dir_fd, fcntl.LOCK_UN)
        os.close(self._dir_fd)
        self._fd = self._dir_fd = None
