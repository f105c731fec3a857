"""Where a store lives: a local directory STORE, and the place its Zarr arrays are kept.

The catalog, the writer lock and shard manifests are always files in STORE (DuckDB allows one
writing process per database file and needs a filesystem with working locks). The arrays are in
STORE/arrays.zarr, or at an object-store URL (`s3://bucket/prefix`) chosen by the store's first
ingest with `--arrays-url` and recorded in STORE/arrays-location.json, which every later command
reads: no command needs the flag again, and nothing else assumes the arrays are local files.
"""

from __future__ import annotations

import json
import os
import socket
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from actstore.core.errors import ActstoreError, UsageError
from actstore.core.files import replace_file

CATALOG = "catalog.duckdb"
ARRAYS = "arrays.zarr"
RECORD = "arrays-location.json"
# The object at an object-store prefix that names the store whose arrays it holds.
MARKER = "actstore-store.json"
OBJECT_SCHEMES = ("s3",)


def local_dir(location: str | Path) -> Path:
    """The store's local directory (catalog, lock, manifests) for a path or `file://` URL."""
    if isinstance(location, Path):
        return location
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme == "file" else location)
    raise UsageError(
        f"store {location}: STORE is a local directory (it holds the catalog); to keep the "
        "arrays in object storage give --arrays-url s3://bucket/prefix to the first ingest"
    )


def store_containing(path: str | Path) -> Path | None:
    """The store directory that `path` resolves into (symlinks followed, the path itself
    included), or None. A store is known by its catalog, its local arrays or the record of its
    arrays' URL, so one whose catalog was lost still counts."""
    resolved = Path(path).expanduser().resolve()
    for place in [resolved, *resolved.parents]:
        if (
            (place / CATALOG).is_file()
            or (place / ARRAYS / "zarr.json").is_file()
            or (place / RECORD).is_file()
        ):
            return place
    return None


@dataclass(frozen=True)
class ArraysRoot:
    """The Zarr root of a store's arrays: a local directory or an object-store URL. Picklable,
    so that Dask workers open the same arrays."""

    url: str

    @property
    def is_local(self) -> bool:
        return "://" not in self.url

    @property
    def local(self) -> Path:
        """The root directory of local arrays."""
        return Path(self.url)

    def key(self, name: str = "") -> str:
        """The full path (local) or URL (object store) of a member, e.g. a chunk's object."""
        return f"{self.url}/{name}" if name else self.url

    def show(self, name: str = "") -> str:
        """A member's name for messages: relative to STORE when local, else its URL."""
        return f"{ARRAYS}/{name}" if self.is_local else self.key(name)

    def filesystem(self) -> Any:
        """The fsspec filesystem holding the arrays."""
        if self.is_local:
            from fsspec.implementations.local import LocalFileSystem

            return LocalFileSystem()
        from actstore.core.object_store import filesystem

        return filesystem(self.url)

    def exists(self, name: str = "") -> bool:
        if self.is_local:
            return os.path.exists(self.key(name))
        from actstore.core.object_store import errors_as_actstore

        with errors_as_actstore(self.url):
            return bool(self.filesystem().exists(self.key(name)))

    def zarr_store(self, read_only: bool) -> Any:
        """What `zarr.open_group`/`open_array` take as `store`: a path, or an fsspec store."""
        if self.is_local:
            return self.url
        from actstore.core.object_store import zarr_store

        return zarr_store(self.url, read_only)


def arrays_root(location: str | Path) -> ArraysRoot:
    """The arrays of the store at `location`: the recorded URL, else STORE/arrays.zarr."""
    store_dir = local_dir(location)
    url = recorded_url(store_dir)
    return ArraysRoot(url) if url else ArraysRoot(str(store_dir / ARRAYS))


def as_root(where: Path | str | ArraysRoot) -> ArraysRoot:
    """An ArraysRoot given one, or a store directory's arrays."""
    return where if isinstance(where, ArraysRoot) else arrays_root(where)


def recorded_url(store_dir: Path) -> str | None:
    """The object-store URL recorded for the store's arrays, if any."""
    record = _record(store_dir)
    return None if record is None else record["url"]


def _record(store_dir: Path) -> dict[str, Any] | None:
    """The store's location record ({"url", "claim"}), if any."""
    try:
        record = json.loads((store_dir / RECORD).read_text())
        record["url"]
        return record
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        raise ActstoreError(
            f"{store_dir / RECORD} is unreadable; write it again as "
            '{"url": "s3://bucket/prefix"} (the URL the store\'s arrays were ingested to)'
        ) from None


def check_arrays_url(store_dir: Path, url: str | None) -> None:
    """Refuse an `--arrays-url` that is malformed or differs from where the store keeps its
    arrays (an existing store's arrays never move)."""
    if url is None:
        return
    parsed = urlparse(url)
    if parsed.scheme not in OBJECT_SCHEMES or not parsed.netloc:
        raise UsageError(
            f"--arrays-url {url}: give an object-store URL such as s3://bucket/prefix "
            f"(schemes: {', '.join(OBJECT_SCHEMES)})"
        )
    from actstore.core.object_store import check_bucket

    check_bucket(url)
    have = recorded_url(store_dir)
    if have is not None and have != normal_url(url):
        raise UsageError(
            f"--arrays-url {url}: store {store_dir} keeps its arrays at {have}; drop "
            "--arrays-url or give that URL (a store's arrays stay where its first ingest put them)"
        )
    if have is None and (store_dir / CATALOG).exists():
        raise UsageError(
            f"--arrays-url {url}: store {store_dir} keeps its arrays in {store_dir / ARRAYS}; "
            "drop --arrays-url, or ingest into a new store to use object storage"
        )


def normal_url(url: str) -> str:
    return url.rstrip("/")


def record_arrays_url(store_dir: Path, url: str | None) -> None:
    """Record where a new store's arrays go, before anything is written there, and claim the
    prefix for this store (`claim_prefix`; a lost marker is written again). The record is
    created once, whoever else (a concurrent shard) tries; a record from before claims gets its
    claim now."""
    record = _record(store_dir)
    if url is None and record is None:
        return
    if record is None:
        store_dir.mkdir(parents=True, exist_ok=True)
        _write_record(store_dir, {"url": normal_url(str(url)), "claim": uuid.uuid4().hex}, True)
    elif "claim" not in record:
        _write_record(store_dir, {**record, "claim": uuid.uuid4().hex}, False)
    record = _record(store_dir)
    assert record is not None
    claim_prefix(store_dir, record["url"], record["claim"])


def _write_record(store_dir: Path, record: dict[str, Any], exclusive: bool) -> None:
    """Write the location record atomically; `exclusive`: only if there is none yet (a
    concurrent shard that recorded it first keeps its record)."""
    replace_file(store_dir / RECORD, lambda tmp: tmp.write_text(json.dumps(record)),
                 exclusive=exclusive)  # fmt: skip


def _marker(url: str) -> dict[str, Any] | None:
    """The claim marker at an object-store prefix, if any."""
    from actstore.core.object_store import errors_as_actstore, filesystem

    fs = filesystem(url)
    with errors_as_actstore(url):
        try:
            return json.loads(fs.cat_file(f"{normal_url(url)}/{MARKER}"))
        except FileNotFoundError:
            return None
        except ValueError:
            return {}


def check_claim(store_dir: Path, url: str) -> None:
    """Refuse an object-store prefix that another store claimed (its marker names that store):
    two stores writing one prefix would overwrite each other's arrays."""
    marker = _marker(url)
    record = _record(store_dir)
    if marker is None or (record is not None and marker.get("claim") == record.get("claim")):
        return
    if (
        record is not None
        and "claim" not in record
        and marker.get("store") == str(store_dir.absolute())
    ):
        return  # a store from before claims, met again at its own path
    owner = f"{marker.get('store', 'another store')} on {marker.get('host', 'another host')}"
    raise UsageError(
        f"--arrays-url {url}: that prefix holds the arrays of another store ({owner}; "
        f"{normal_url(url)}/{MARKER}); give each store its own prefix"
    )


def claim_prefix(store_dir: Path, url: str, claim: str) -> None:
    """Write the marker naming this store at its arrays' prefix, unless it is there already;
    another store's marker is refused (`check_claim`)."""
    from actstore.core.object_store import errors_as_actstore, filesystem

    check_claim(store_dir, url)
    if _marker(url) is None:
        marker = {"claim": claim, "store": str(store_dir.absolute()),
                  "host": socket.gethostname()}  # fmt: skip
        with errors_as_actstore(url):
            filesystem(url).pipe_file(f"{normal_url(url)}/{MARKER}", json.dumps(marker).encode())


def run_groups(root: ArraysRoot) -> list[str]:
    """The run groups (`run<id>`) under an arrays root, local or in object storage."""
    if root.is_local:
        names = (
            [p.name for p in root.local.glob("run*") if p.is_dir()] if root.local.is_dir() else []
        )
    else:
        from actstore.core.object_store import errors_as_actstore

        with errors_as_actstore(root.url):
            try:
                keys = root.filesystem().ls(root.url, refresh=True)
            except FileNotFoundError:  # nothing under the prefix yet
                keys = []
            names = [k.rstrip("/").rsplit("/", 1)[-1] for k in keys]
    return sorted((n for n in names if n[3:].isdigit() and n.startswith("run")), key=len)


def check_no_lost_catalog(store_dir: Path, root: ArraysRoot) -> None:
    """Refuse an ingest that would create a catalog beside arrays of runs it does not know: the
    catalog was deleted or lost, and its new run 1 would overwrite the old run 1's arrays."""
    if (store_dir / CATALOG).exists():
        return
    runs = run_groups(root)
    if runs:
        where = store_dir / ARRAYS if root.is_local else root.url
        raise ActstoreError(
            f"store {store_dir} has no catalog.duckdb, but {where} holds the arrays of "
            f"{', '.join(runs[:5])}{'…' if len(runs) > 5 else ''}: an ingest would overwrite "
            "them; restore catalog.duckdb from a backup of the store, or move the arrays away "
            "to start a new store there"
        )
