"""Reading a run's arrays with every chunk checked against the chunk ledger.

zarr returns the fill value for a chunk file that is gone, and an altered or swapped file decodes
to other numbers; neither raises. Every read of a run's activations therefore goes through
`VerifiedArray`, which checks each chunk it touches (file present, decodable, checksum of the
decoded values equal to the ledger's) and otherwise fails naming run, side, hook and chunk.

Every read checks again, with no cache that a file changed in place could slip past: zarr
decodes whole chunks anyway, and hashing the decoded values costs a few percent of a query
(measured in benchmarks/patching.py).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from actstore.core import arrays as zarrays
from actstore.core.arrays import open_array
from actstore.core.errors import DamagedError, first_line
from actstore.core.location import ArraysRoot, as_root

FIX = "run actstore verify --repair"


@dataclass(frozen=True)
class LedgerEntry:
    """What the ledger recorded for one chunk: its prompt range and checksum."""

    start: int
    stop: int
    checksum: str


Ledger = dict[int, LedgerEntry]


class ChunkProblem(Exception):
    """A chunk that does not match its ledger row: `problem` is `missing` or `damaged`."""

    def __init__(self, problem: str, detail: str):
        super().__init__(detail)
        self.problem = problem
        self.detail = detail


def read_checked(arr: Any, root: ArraysRoot, name: str, entry: LedgerEntry) -> np.ndarray:
    """A chunk's decoded values when they match the ledger; ChunkProblem otherwise."""
    key = chunk_path(arr, name, entry.start // arr.chunks[0])
    if key is not None and not root.exists(key):
        raise ChunkProblem("missing", f"chunk file {root.show(key)} is gone")
    try:
        values = np.asarray(arr[entry.start : entry.stop])
    except Exception as exc:  # a damaged chunk fails inside the codec: any error means damage
        raise ChunkProblem("damaged", f"chunk does not decode: {first_line(exc)}") from None
    if zarrays.checksum(values) != entry.checksum:
        raise ChunkProblem("damaged", "checksum of the decoded values differs from the ledger")
    return values


def chunk_path(arr: Any, name: str, idx: int) -> str | None:
    """The key of chunk `idx` under the root; None for a sharded array (chunks share shard
    files)."""
    if arr.shards is not None:
        return None
    return zarrays.chunk_key(name, idx, arr.ndim)


class VerifiedArray:
    """Read-only access to one (run, side, hook) array; indexing checks the chunks it touches.

    Supports what queries use: `arr[i]`, `arr[a:b]`, `arr[a:b, ...more axes]`, and the shape,
    dtype, ndim, chunks and nbytes of the zarr array. Picklable (for Dask workers): a copy
    reopens the array.
    """

    def __init__(
        self,
        store_dir: Path | ArraysRoot,
        run_id: int,
        side: str,
        hook: str,
        ledger: Ledger,
        refresh: Callable[[], Ledger] | None = None,
        metadata: str | None = None,
    ):
        self.root = as_root(store_dir)
        self.run_id, self.side, self.hook = run_id, side, hook
        self.name = zarrays.array_name(run_id, side, hook)
        self.ledger = ledger
        self.refresh = refresh
        self.metadata = metadata
        self.zarr = self._open()

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "zarr": None, "refresh": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self.zarr = self._open()

    def _open(self) -> Any:
        """The zarr array, once its metadata says what the catalog records (shape, chunks,
        dtype, codecs, fill value): an edited `zarr.json` would read other numbers, or fewer."""
        arr = open_array(self.root, self.name)
        if self.metadata is not None:
            difference = zarrays.metadata_difference(arr, self.metadata)
            if difference is not None:
                raise DamagedError(
                    f"run {self.run_id} {self.side} {self.hook}: the array's metadata "
                    f"{self.root.show(self.name)}/zarr.json {difference}; {FIX}"
                )
        return arr

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(self.zarr.shape)

    @property
    def dtype(self) -> np.dtype:
        return self.zarr.dtype

    @property
    def ndim(self) -> int:
        return self.zarr.ndim

    @property
    def chunks(self) -> tuple[int, ...]:
        return tuple(self.zarr.chunks)

    @property
    def nbytes(self) -> int:
        return int(self.zarr.nbytes)

    def __len__(self) -> int:
        return self.shape[0]

    def __array__(self, dtype: Any = None, copy: bool | None = None) -> np.ndarray:
        data = self[:]
        return data if dtype is None else data.astype(dtype)

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        first, rest = (key[0], key[1:]) if key else (slice(None), ())
        n = self.shape[0]
        if first is Ellipsis and not rest:
            first = slice(None)
        if isinstance(first, (int, np.integer)):
            i = int(first) + (n if first < 0 else 0)
            if not 0 <= i < n:
                raise IndexError(f"index {first} is out of range for {n} prompts")
            data = self._rows(i, i + 1)[0]
            return data[rest] if rest else data
        if not isinstance(first, slice) or first.step not in (None, 1):
            raise TypeError(f"{self.name}: index the prompt axis with an int or a slice")
        start, stop, _ = first.indices(n)
        data = self._rows(start, max(start, stop))
        return data[(slice(None), *rest)] if rest else data

    def _rows(self, start: int, stop: int) -> np.ndarray:
        """Prompts [start, stop), each chunk touched checked against the ledger."""
        size, n = self.chunks[0], self.shape[0]
        out = np.empty((stop - start, *self.shape[1:]), dtype=self.dtype)
        if stop <= start:
            return out
        for idx in range(start // size, zarrays.batch_count(stop, size)):
            lo, hi = zarrays.batch_bounds(idx, size, n)
            a, b = max(lo, start), min(hi, stop)
            out[a - start : b - start] = self._verified(idx, lo, hi)[a - lo : b - lo]
        return out

    def _verified(self, idx: int, lo: int, hi: int) -> np.ndarray:
        entry = self._entry(idx, lo, hi)
        try:
            return read_checked(self.zarr, self.root, self.name, entry)
        except ChunkProblem as problem:
            if self.refresh is None:
                raise self._error(idx, lo, hi, problem) from None
            self.ledger, self.refresh = self.refresh(), None  # the ledger may have moved on
            return self._verified(idx, lo, hi)

    def _entry(self, idx: int, lo: int, hi: int) -> LedgerEntry:
        entry = self.ledger.get(idx)
        if entry is None and self.refresh is not None:
            self.ledger, self.refresh = self.refresh(), None
            entry = self.ledger.get(idx)
        if entry is None:
            raise DamagedError(
                f"run {self.run_id} {self.side} {self.hook} chunk {idx} (prompts {lo}..{hi - 1}) "
                "is not in the chunk ledger (not written yet, or the ledger lost it); see "
                "actstore verify"
            )
        return entry

    def _error(self, idx: int, lo: int, hi: int, problem: ChunkProblem) -> DamagedError:
        return DamagedError(
            f"run {self.run_id} {self.side} {self.hook} chunk {idx} (prompts {lo}..{hi - 1}) is "
            f"{problem.problem}: {problem.detail}; {FIX}"
        )
