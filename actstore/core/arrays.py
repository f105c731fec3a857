"""Zarr arrays of activations: one per (run, side, hook), chunked along the prompt axis.

One ingest batch writes whole chunks and nothing else, so chunks never share writers. A chunk's
checksum is taken over its decoded values, so `verify` detects damage whatever the codec.
zarr is imported on first use: a query answered from the catalog never needs it.

Every function takes where the arrays are as an `ArraysRoot` (local directory or object store),
or a store directory whose recorded location is looked up.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from functools import lru_cache
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from actstore.core.files import replace_file
from actstore.core.location import ARRAYS as ARRAYS  # where a store's local arrays are
from actstore.core.location import ArraysRoot, as_root

if TYPE_CHECKING:
    import zarr

Where = Path | str | ArraysRoot

# lz4 level 5 after bitshuffle: nearly zstd's ratio on activations at many times its speed
# (measured by benchmarks/ingestion.py; the figures are in the README, Storage).
CODEC_NAME = "blosc-lz4-5-bitshuffle"
# Every chunk gets a file, even one equal to the fill value, so that a missing file means damage.
WRITE_CONFIG = {"write_empty_chunks": True}


def batch_count(n: int, batch: int) -> int:
    """How many batches `n` prompts fill: chunks along the prompt axis, the last one short."""
    return -(-n // batch)


def batch_bounds(b: int, batch: int, n: int) -> tuple[int, int]:
    """Prompts [lo, hi) of batch `b`: a batch is a chunk of every array, the last one short."""
    return b * batch, min(n, (b + 1) * batch)


def run_group(run_id: int) -> str:
    """The group holding every array of a run."""
    return f"run{run_id}"


def array_name(run_id: int, side: str, hook: str) -> str:
    return f"{run_group(run_id)}/{side}/{hook}"


def codec():
    from zarr.codecs import BloscCodec

    return BloscCodec(cname="lz4", clevel=5, shuffle="bitshuffle")


def open_root(where: Where, mode: str = "r") -> zarr.Group:
    import zarr

    root = as_root(where)
    return zarr.open_group(root.zarr_store(read_only=mode == "r"), mode=mode)


def create_array(
    root: zarr.Group,
    name: str,
    shape: tuple[int, ...],
    chunk_prompts: int,
    dtype: str,
    replace: bool = True,
) -> zarr.Array:
    """Create (or reopen, on resume) an array chunked by `chunk_prompts` prompts.

    An existing array of other shape or chunks is replaced, or with `replace=False` (other
    writers' chunks may be in it, as with shards) refused.
    """
    chunks = (chunk_prompts, *shape[1:])
    if name in root:
        arr = root[name]
        have = (tuple(arr.shape), tuple(arr.chunks), str(arr.dtype))
        want = (tuple(shape), chunks, dtype)
        if have[:2] == want[:2] and (replace or have == want):
            return arr.with_config(WRITE_CONFIG)
        if not replace:
            from actstore.core.errors import ActstoreError

            raise ActstoreError(
                f"array {name} has shape/chunks/dtype {have}, this ingest needs {want}; "
                f"delete arrays.zarr/{name} and rerun"
            )
        del root[name]
    return _create(root, name, shape, chunks, dtype, overwrite=replace).with_config(WRITE_CONFIG)


def create_metadata(
    root: zarr.Group, name: str, shape: tuple[int, ...], chunk_prompts: int, dtype: str
) -> None:
    """Write lost array metadata again (as recorded in the catalog), keeping the chunk files
    that are still there."""
    _create(root, name, shape, (chunk_prompts, *shape[1:]), dtype, overwrite=False)


def _create(
    root: zarr.Group,
    name: str,
    shape: tuple[int, ...],
    chunks: tuple[int, ...],
    dtype: str,
    overwrite: bool,
) -> zarr.Array:
    return root.create_array(
        name=name,
        shape=shape,
        chunks=chunks,
        dtype=dtype,
        compressors=codec(),
        fill_value=0,
        overwrite=overwrite,
    )


@lru_cache(maxsize=256)
def metadata_document(shape: tuple[int, ...], chunks: tuple[int, ...], dtype: str) -> str:
    """The `zarr.json` that an array of ours with this shape, chunking and dtype has: written by
    zarr itself, into memory, so that it is exactly what an ingest writes. The catalog records it
    (`arrays.metadata`) so that a read can tell an edited `zarr.json` and a repair restore it."""
    return _written_in_memory(
        "a/zarr.json", lambda group: _create(group, "a", shape, chunks, dtype, overwrite=False)
    )


def _written_in_memory(key: str, make: Any) -> str:
    """The text zarr writes at `key` when `make(group)` runs on an empty group in memory."""
    import asyncio

    import zarr
    from zarr.core.buffer import default_buffer_prototype
    from zarr.storage import MemoryStore

    memory = MemoryStore()
    make(zarr.open_group(memory, mode="a"))
    return asyncio.run(memory.get(key, default_buffer_prototype())).to_bytes().decode()


def expected_metadata(row: dict) -> str | None:
    """The metadata document an `arrays` row says its array has: the recorded one, else (a row
    recorded before documents were) the one its shape, chunks and dtype give under our codec."""
    if row.get("metadata"):
        return row["metadata"]
    if row.get("codec") != CODEC_NAME:
        return None
    return metadata_document(
        tuple(json.loads(row["shape"])), tuple(json.loads(row["chunks"])), row["dtype"]
    )


# What a reader relies on in an array's metadata; attributes carry nothing a read uses.
METADATA_FIELDS = ("shape", "data_type", "chunk_grid", "chunk_key_encoding", "fill_value",
                   "codecs", "node_type", "zarr_format", "storage_transformers")  # fmt: skip


def metadata_difference(arr: zarr.Array, expected: str) -> str | None:
    """How the opened array's metadata differs from the document the catalog records (the first
    field that differs, both ways), or None when it says what the catalog says."""
    from zarr.core.buffer import default_buffer_prototype

    have = json.loads(
        arr.metadata.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes()
    )
    want = _as_zarr_writes_it(expected)
    for field in METADATA_FIELDS:
        if have.get(field) != want.get(field):
            return f"says {field} {_short(have.get(field))} where the catalog records " + _short(
                want.get(field)
            )
    return None


@lru_cache(maxsize=256)
def _as_zarr_writes_it(document: str) -> dict:
    """A recorded document read and written again by this zarr, as the opened array's metadata
    is: a zarr release that spells a field another way changes both sides alike."""
    from zarr.core.buffer import default_buffer_prototype
    from zarr.core.metadata.v3 import ArrayV3Metadata

    meta = ArrayV3Metadata.from_dict(json.loads(document))
    return json.loads(meta.to_buffer_dict(default_buffer_prototype())["zarr.json"].to_bytes())


def _short(value: object) -> str:
    text = json.dumps(value, separators=(",", ":"))
    return text if len(text) <= 80 else text[:77] + "..."


def write_metadata(where: Where, name: str, document: str) -> None:
    """Write an array's `zarr.json` (the recorded document) in place, leaving its chunks alone;
    whatever stands at that key (garbage, a directory) is replaced."""
    put(where, f"{name}/zarr.json" if name else "zarr.json", document.encode())


def put(where: Where, key: str, data: bytes) -> None:
    """Replace the object at `key` by `data`: atomically by rename when local (a directory
    standing there is removed first)."""
    root = as_root(where)
    if not root.is_local:
        root.filesystem().pipe_file(root.key(key), data)
        return
    path = Path(root.key(key))
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    write_durably(path, data)


def write_durably(path: Path, data: bytes) -> None:
    """Replace the file at `path` by `data` atomically and durably: a partial file beside it,
    flushed, renamed into place, the rename flushed. A crash leaves the old file or the new."""
    replace_file(path, lambda tmp: tmp.write_bytes(data), sync=fsync_path)


@lru_cache(maxsize=1)
def root_document() -> str:
    """The `zarr.json` of the arrays' root group, as zarr writes it."""
    return _written_in_memory("zarr.json", lambda group: None)


def clear_chunk_key(where: Where, name: str, chunk_idx: int, ndim: int) -> None:
    """Remove what is not a chunk file at a chunk's key (a directory put there), so that the
    chunk can be written again; a file is left for the write to replace."""
    root = as_root(where)
    if root.is_local:
        path = root.local / chunk_key(name, chunk_idx, ndim)
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path)


def root_problem(where: Where) -> str | None:
    """What is wrong with the arrays' root group metadata (`zarr.json` at the root), or None:
    gone, not JSON, or not a Zarr v3 group."""
    root = as_root(where)
    try:
        if root.is_local:
            data = Path(root.key("zarr.json")).read_bytes()
        else:
            from actstore.core.object_store import errors_as_actstore

            with errors_as_actstore(root.url):
                data = root.filesystem().cat_file(root.key("zarr.json"))
    except FileNotFoundError:
        return "is gone"
    except IsADirectoryError:
        return "is a directory, not a file"
    except OSError as exc:
        return f"cannot be read ({exc.strerror or exc})"
    try:
        doc = json.loads(data)
    except (ValueError, UnicodeDecodeError):
        return "is not JSON"
    if not isinstance(doc, dict) or doc.get("node_type") != "group" or doc.get("zarr_format") != 3:
        return "is not a Zarr v3 group's metadata"
    return None


def open_array(where: Where, name: str, mode: str = "r") -> zarr.Array:
    """The array `name`, opened by its own metadata: no group metadata is needed on the way."""
    import zarr

    root = as_root(where)
    return zarr.open_array(store=root.zarr_store(read_only=mode == "r"), path=name, mode=mode)


def remove_run(where: Where, run_id: int) -> None:
    """Delete every array of a run (a discarded or rolled-back ingest)."""
    remove_tree(where, run_group(run_id))


def remove_tree(where: Where, name: str) -> None:
    """Delete a group (or array) and everything under it; nothing there is fine."""
    root = as_root(where)
    if root.is_local:
        shutil.rmtree(root.key(name), ignore_errors=True)
        return
    fs = root.filesystem()
    if fs.exists(root.key(name)):
        fs.rm(root.key(name), recursive=True)


def remove_partial_files(where: Where, name: str = "") -> int:
    """Delete the temporary files (`*.partial`) of chunk writes that a killed writer left under
    `name`; only call it while no writer can be writing there. Object stores have none: a PUT
    lands whole or not at all."""
    root = as_root(where)
    if not root.is_local:
        return 0
    removed = 0
    for p in Path(root.key(name)).rglob("*.partial"):
        p.unlink(missing_ok=True)
        removed += 1
    return removed


def run_dir(store_dir: Path, run_id: int) -> Path:
    """The directory holding every array of a run in a store with local arrays."""
    return as_root(store_dir).local / run_group(run_id)


def checksum(values: np.ndarray) -> str:
    """Digest of a chunk's decoded values (dtype and shape included)."""
    data = np.ascontiguousarray(values)
    h = hashlib.blake2b(digest_size=16)
    h.update(f"{data.dtype.str}{data.shape}".encode())
    h.update(data.reshape(-1).view(np.uint8))  # the bytes in place, without a copy
    return h.hexdigest()


def chunk_key(name: str, chunk_idx: int, ndim: int) -> str:
    """Where zarr v3's default key encoding puts chunk `chunk_idx` of a prompt-chunked array,
    relative to the root."""
    return "/".join([name, "c", str(chunk_idx)] + ["0"] * (ndim - 1))


def make_durable(root: ArraysRoot, name: str, chunk_idx: int, ndim: int) -> None:
    """Flush a written chunk to disk (local arrays); an object store's PUT is durable already."""
    if root.is_local:
        fsync_path(root.local / chunk_key(name, chunk_idx, ndim))


def fsync_path(path: Path) -> None:
    """Make a written file durable (and its directory entry)."""
    if not path.exists():
        return
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    dfd = os.open(path.parent, os.O_RDONLY)
    try:
        os.fsync(dfd)
    finally:
        os.close(dfd)


def stored_bytes(where: Where, name: str) -> int:
    """Bytes the array occupies on disk or in the object store, metadata included; a partial
    file a killed writer left beside a chunk (zarr's or ours, `*.partial`) is not the array's."""
    root = as_root(where)
    if root.is_local:
        return sum(
            p.stat().st_size
            for p in Path(root.key(name)).rglob("*")
            if p.is_file() and p.suffix != ".partial"
        )
    return int(root.filesystem().du(root.key(name), total=True))
