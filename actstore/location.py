"""Where a store lives: a local directory, or a `file://` URL whose arrays go through fsspec.

The catalog, the writer lock and shard manifests are local files (DuckDB needs a local file and
flock a local filesystem); the Zarr arrays are addressed by URL so that zarr reaches them through
fsspec. Object stores (`s3://`, with the `s3` extra) are described in docs/scale.md and not yet
accepted as a STORE argument.
"""

from __future__ import annotations

from pathlib import Path
from urllib.parse import urlparse

from actstore.arrays import ARRAYS
from actstore.errors import UsageError


def local_dir(location: str | Path) -> Path:
    """The store's local directory (catalog, lock, manifests) for a path or `file://` URL."""
    if isinstance(location, Path):
        return location
    parsed = urlparse(location)
    if parsed.scheme in ("", "file"):
        return Path(parsed.path if parsed.scheme == "file" else location)
    raise UsageError(
        f"store {location}: {parsed.scheme}:// stores are not supported as STORE; keep the store "
        "directory local or on a shared filesystem (see docs/scale.md)"
    )


def arrays_url(location: str | Path) -> tuple[str, dict]:
    """URL of the store's Zarr root and the fsspec options zarr needs to open it."""
    if isinstance(location, str) and location.startswith("file://"):
        return f"file://{local_dir(location)}/{ARRAYS}", {"auto_mkdir": True}
    return str(local_dir(location) / ARRAYS), {}
