"""One DuckDB instance per process; catalog files are attached to it for the length of a read
or a write.

Building a DuckDB instance is costly (it registers every built-in function); attaching a file
to a live one is cheap (both measured in docs/reliability.md). Catalog connections are
short-lived so that other processes can
open the file between them, so a command opens the catalog tens of times: it attaches, never
builds. Attaching takes the same file lock as opening, and detaching releases it, so other
processes see exactly the locking of one connection per open.

A file is attached once per process however many connections use it: detaching a second
attachment of the same file would close its descriptor, and POSIX drops every lock the process
holds on a file when any descriptor of it closes. Readers and the writer of one process share
one mode (read-only, or read-write in the writer); asking for the other while the file is held
is refused, as DuckDB refuses two configurations of one file. A connection that needs an
instance of its own (the SQL sandbox: its settings hold instance-wide) waits until no connection
of the process uses the file, and holds the others off while it is open, for the same reason.
The instance runs one thread, so that a process forked while it exists finds no thread missing;
a forked child builds its own.
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from dataclasses import dataclass, field
from pathlib import Path

import duckdb


@dataclass
class _Held:
    alias: str
    read_only: bool
    users: dict[int, int] = field(default_factory=dict)  # connection id -> its thread


class Attachments:
    """The attached catalog files of this process and the instance they are attached to."""

    def __init__(self) -> None:
        self._lock = threading.Condition()
        self._apart: dict[str, int] = {}  # file -> thread with it open in an instance of its own
        self._names = itertools.count()
        self._base: duckdb.DuckDBPyConnection | None = None
        self._held: dict[str, _Held] = {}
        self._of: dict[int, str] = {}  # connection id -> key of the file it uses
        self._orphans: list[duckdb.DuckDBPyConnection] = []

    def _instance(self) -> duckdb.DuckDBPyConnection:
        if self._base is None:
            self._base = duckdb.connect(config={"threads": 1})
        return self._base

    def forget(self) -> None:
        """In a forked child: start afresh. The parent's instance is never closed here (its
        locks and state are the parent's), only kept from the garbage collector; the lock may
        have been held by a parent thread that does not exist here."""
        self._lock = threading.Condition()
        if self._base is not None:
            self._orphans.append(self._base)
        self._base = None
        self._held.clear()
        self._of.clear()
        self._apart.clear()

    def open(self, path: Path, read_only: bool) -> duckdb.DuckDBPyConnection:
        """A connection whose default database is the catalog file at `path`.

        Raises duckdb.Error as DuckDB's own open would: a lock held by another process, a file
        that cannot be read, or a mode this process does not hold the file in."""
        key = str(Path(path).absolute())
        with self._lock:
            if self._apart.get(key) == threading.get_ident():
                raise RuntimeError(f"catalog {key} opened inside its own sandboxed connection")
            self._lock.wait_for(lambda: key not in self._apart)
            base = self._instance()
            held = self._held.get(key)
            if held is not None and held.read_only != read_only:
                mode = "read-only" if held.read_only else "read-write"
                raise duckdb.ConnectionException(
                    f"this process holds the file {mode}; it cannot be opened in the other "
                    "mode until that connection closes"
                )
            con = base.cursor()
            attached = held is None
            if held is None:
                held = _Held(f"catalog_{next(self._names)}", read_only)
            try:
                if attached:
                    quoted = key.replace("'", "''")
                    option = " (READ_ONLY)" if read_only else ""
                    con.execute(f"ATTACH '{quoted}' AS {held.alias}{option}")
                con.execute(f"USE {held.alias}")
            except BaseException:
                con.close()
                if attached:
                    with suppress(duckdb.Error):  # attached, then refused its USE
                        base.execute(f"DETACH DATABASE IF EXISTS {held.alias}")
                self._recover(base)
                raise
            self._held[key] = held
            held.users[id(con)] = threading.get_ident()
            self._of[id(con)] = key
            return con

    @contextmanager
    def apart(self, path: Path) -> Iterator[None]:
        """Keep the file free of this process's other connections while a connection in an
        instance of its own uses it: closing that instance's descriptor would drop the lock
        they rely on (and theirs, the lock it relies on)."""
        key = str(Path(path).absolute())
        me = threading.get_ident()
        with self._lock:
            held = self._held.get(key)
            if self._apart.get(key) == me or (held is not None and me in held.users.values()):
                raise RuntimeError(f"sandboxed SQL on {key} while this thread has it open")
            self._lock.wait_for(lambda: key not in self._held and key not in self._apart)
            self._apart[key] = me
        try:
            yield
        finally:
            with self._lock:
                del self._apart[key]
                self._lock.notify_all()

    def close(self, con: duckdb.DuckDBPyConnection) -> None:
        """Close a connection from `open`; the last one of a file detaches it."""
        with self._lock:
            key = self._of.pop(id(con), None)
            con.close()
            held = self._held.get(key) if key is not None else None
            if held is None:
                return
            held.users.pop(id(con), None)
            if not held.users:
                del self._held[key]
                self._lock.notify_all()
                base = self._instance()
                try:
                    base.execute(f"DETACH {held.alias}")
                except duckdb.Error:
                    self._recover(base)

    def _recover(self, base: duckdb.DuckDBPyConnection) -> None:
        """After a failure: a damaged file can invalidate the whole instance (DuckDB's fatal
        errors); then the next open builds a new one."""
        try:
            base.execute("SELECT 1")
        except duckdb.Error:
            self._orphans.append(base)
            self._base = None
            self._held.clear()
            self._of.clear()
            self._lock.notify_all()


ATTACHMENTS = Attachments()
os.register_at_fork(after_in_child=ATTACHMENTS.forget)
