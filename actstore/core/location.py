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
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from actstore.core.errors import UsageError

CATALOG = "catalog.duckdb"
ARRAYS = "arrays.zarr"
RECORD = "arrays-location.json"
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
    try:
        return json.loads((store_dir / RECORD).read_text())["url"]
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError):
        from actstore.core.errors import ActstoreError

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
    have = recorded_url(store_dir)
    if have is not None and have != normal_url(url):
        raise UsageError(
            f"--arrays-url {url}: store {store_dir} keeps its arrays at {have}; drop "
            "--arrays-url or give that URL (a store's arrays stay where its first ingest put them)"
        )
    if have is None and (store_dir / "catalog.duckdb").exists():
        raise UsageError(
            f"--arrays-url {url}: store {store_dir} keeps its arrays in {store_dir / ARRAYS}; "
            "drop --arrays-url, or ingest into a new store to use object storage"
        )


def normal_url(url: str) -> str:
    return url.rstrip("/")


def record_arrays_url(store_dir: Path, url: str | None) -> None:
    """Record where a new store's arrays go, before anything is written there (atomically)."""
    if url is None or recorded_url(store_dir) is not None:
        return
    store_dir.mkdir(parents=True, exist_ok=True)
    tmp = store_dir / f"{RECORD}.tmp"
    tmp.write_text(json.dumps({"url": normal_url(url)}))
    os.replace(tmp, store_dir / RECORD)


def arrays_url(location: str | Path) -> tuple[str, dict]:
    """URL of the store's Zarr root and the fsspec options zarr needs to open it."""
    root = arrays_root(location)
    if not root.is_local:
        return root.url, {}
    if isinstance(location, str) and location.startswith("file://"):
        return f"file://{root.url}", {"auto_mkdir": True}
    return root.url, {}
