"""The one reader of a run's stored arrays: prompt spans in, tensors out, for every query family.

Patching, attribution, circuits and subspace patching all read through a `Reader`: it walks the
run's prompts in spans (the run's ingest batches by default, so memory is bounded by one span),
and `tensor` is the single place where a stored array becomes a tensor. A hook the run stores is
read as stored; one it does not store (a lean run: actstore.model.derivable) is derived from the
stored ones with the query's engine (queries/core/derive.py), each intermediate once per span and
side. What a query needs beyond the arrays (final positions, answers and answer sets; the clean
logits a metric compares with are an array) comes from the run's prompts table, read per span:
only the columns a query uses (`COLUMNS`, never the texts) of the span's prompts, and only the
current span's kept, so a reader's memory does not grow with the number of prompts.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import polars as pl
import torch

from actstore.core.arrays import batch_bounds, batch_count
from actstore.core.choices import SIDES
from actstore.core.errors import DamagedError, UsageError
from actstore.core.store import Store
from actstore.core.verified import VerifiedArray
from actstore.model.derivable import TOKENS
from actstore.model.metrics import AnswerSets, Targets, answer_arrays
from queries.core.derive import Derivation
from queries.core.engine import Engine
from queries.core.run_model import model_for_run

# The prompts columns every query reads, per span: final positions, answers and answer sets.
COLUMNS = ("seq_len", "answer_token", "wrong_answer_token", "answer_tokens", "wrong_answer_tokens")


@dataclass(frozen=True)
class Span:
    """Prompts [lo, hi) of a run, or the chosen prompts `rows` among them (absolute indices)."""

    lo: int
    hi: int
    rows: np.ndarray | None = None

    @property
    def index(self) -> np.ndarray:
        """The span's prompt indices."""
        return np.arange(self.lo, self.hi) if self.rows is None else self.rows

    @property
    def size(self) -> int:
        return len(self.index)


def sides(direction: str) -> tuple[str, str]:
    """(base side, source side) of a patching direction: denoise patches clean into corrupted."""
    return ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")


class Reader:
    """A run's stored arrays and prompt columns as tensors on one device."""

    def __init__(
        self,
        store: Store,
        run: int | dict,
        device: str | torch.device,
        engine: Engine | None = None,
    ):
        self.store = store
        self.engine = engine
        self.device = device
        with store.reading():
            self.run = store.run(run) if isinstance(run, int) else run
            self.run_id = int(self.run["run_id"])
            self.stored = {side: set(store.hooks(self.run_id, side)) for side in SIDES}
        self.n = int(self.run["n_prompts"])
        # The current span's COLUMNS, keyed by its range (memory: one span's).
        self._span: tuple[tuple[int, int], pl.DataFrame] | None = None
        self.derived = set(self.run["params"].get("derived", []))
        self._derivations: dict[tuple, Derivation] = {}
        # Each (side, hook) array opened once per reader, i.e. per query: its metadata is read
        # once, not per span; every chunk read through it is still checked against the ledger.
        self._arrays: dict[tuple[str, str], VerifiedArray] = {}

    def require(self, hooks: Iterable[str], what: str) -> None:
        """Refuse before any work when a side lacks a hook that `what` reads."""
        for side in SIDES:
            missing = [h for h in hooks if h not in self.stored[side] and h not in self.derived]
            if missing:
                raise UsageError(
                    f"run {self.run_id} lacks {side} {missing[0]} (and {len(missing) - 1} more) "
                    f"that {what} reads; re-ingest with --hooks default"
                )

    def spans(self, size: int | None = None, chosen: np.ndarray | None = None) -> Iterator[Span]:
        """The run's prompts in spans of `size` (default: the run's ingest batches); with
        `chosen`, only those prompts, each span keeping the ones in its range."""
        step = int(self.run["batch_size"]) if size is None else size
        picked = None if chosen is None else np.sort(np.asarray(chosen))
        for b in range(batch_count(self.n, step)):
            lo, hi = batch_bounds(b, step, self.n)
            if picked is None:
                yield Span(lo, hi)
                continue
            rows = picked[(picked >= lo) & (picked < hi)]
            if len(rows):
                yield Span(lo, hi, rows)

    def tensor(
        self,
        side: str,
        hook: str,
        span: Span,
        dtype: torch.dtype = torch.float32,
        positions: tuple[int, ...] | None = None,
    ) -> torch.Tensor:
        """The activation (side, hook) of the span's prompts: stored, or derived from the stored
        ones. Every array read passes here. With `positions`, only those positions (B, P, …) of
        a hook with a position axis: a derived one then costs only them."""
        if hook in self.stored[side]:
            return self._stored(side, hook, span, positions).to(dtype)
        with torch.no_grad():
            return self._derivation(side, span, hook, positions).get(hook).to(dtype)

    def _stored(
        self, side: str, hook: str, span: Span, positions: tuple[int, ...] | None = None
    ) -> torch.Tensor:
        array = self._arrays.get((side, hook))
        if array is None:
            array = self._arrays[(side, hook)] = self.store.array(self.run_id, side, hook)
        data = array[span.lo : span.hi]
        if span.rows is not None:
            data = data[span.rows - span.lo]
        if positions is not None:
            data = np.asarray(data)[:, list(positions)]
        return torch.as_tensor(np.asarray(data), device=self.device)

    def _derivation(
        self, side: str, span: Span, hook: str, positions: tuple[int, ...] | None
    ) -> Derivation:
        """The span's derivation for `side` (of those positions); only the current span's are
        kept (memory: one)."""
        where = (span.lo, span.hi, None if span.rows is None else span.rows.tobytes())
        key = (side, positions, *where)
        if key not in self._derivations:
            if self.engine is None:
                raise UsageError(
                    f"run {self.run_id} derives {hook} on read, and this reader has no model to "
                    "derive it with; pass the query's engine to Reader"
                )
            self._derivations = {k: v for k, v in self._derivations.items() if k[2:] == where}

            def read(name: str) -> torch.Tensor | None:
                if name not in self.stored[side]:
                    return None
                values = self._stored(side, name, span, positions)
                return values.long() if name == TOKENS else values.float()

            at = None if positions is None else torch.tensor(positions, device=self.device)
            self._derivations[key] = Derivation(self.engine, read, self.finals(span), at)
        return self._derivations[key]

    def prompts(self, span: Span) -> pl.DataFrame:
        """The span's prompts' `COLUMNS`, in prompt order: read from the catalog on the span's
        first ask; only the current span's range is kept."""
        current = self._span
        if current is None or current[0] != (span.lo, span.hi):
            current = self._span = ((span.lo, span.hi), self._read(COLUMNS, span.lo, span.hi))
        frame = current[1]
        return frame if span.rows is None else frame[span.rows - span.lo]

    def values(self, name: str, index: np.ndarray) -> list[Any]:
        """One prompts column (checked against the catalog's) of the prompts `index` (sorted,
        within one span, as a batch's `prompt_idx`), read from the catalog for them alone."""
        lo = int(index[0]) if len(index) else 0
        hi = int(index[-1]) + 1 if len(index) else 0
        values = self._read([name], lo, hi)[name].to_list()
        return [values[int(i) - lo] for i in index]

    def _read(self, columns: Iterable[str], lo: int, hi: int) -> pl.DataFrame:
        """Prompts [lo, hi)'s `columns`; a prompt without its row is damage, never a shift."""
        frame = self.store.prompts(self.run_id, list(columns), lo, hi)
        if frame.height != hi - lo:
            raise DamagedError(
                f"run {self.run_id} prompts {lo}..{hi - 1}: the prompts table holds "
                f"{frame.height} of their {hi - lo} rows; run actstore verify"
            )
        return frame

    def column(self, name: str, span: Span) -> torch.Tensor:
        """A prompts column ("seq_len", "answer_token", "wrong_answer_token") as token ids."""
        values = self.prompts(span)[name].to_numpy()
        return torch.as_tensor(np.asarray(values, dtype=np.int64), device=self.device)

    def finals(self, span: Span) -> torch.Tensor:
        """Each prompt's final position."""
        return self.column("seq_len", span) - 1

    def answer_sets(self, span: Span) -> AnswerSets:
        """The span's answer sets, padded to the widest set among the span's prompts."""
        return AnswerSets.from_arrays(answer_arrays(self.prompts(span)), 0, span.size, self.device)

    def targets(self, span: Span) -> Targets:
        """What the metrics compare against: answers, answer sets and the stored clean logits."""
        return Targets(
            self.column("answer_token", span),
            self.column("wrong_answer_token", span),
            self.tensor("clean", "logits", span),
            self.answer_sets(span),
        )


class DerivedArray:
    """A hook the run derives on read, as a read-only array over prompts (for Dask, which reads
    stored hooks as their verified arrays): `arr[a:b, ...]` derives prompts [a, b) with a
    Reader on the run's model, reading every stored chunk it needs verified.

    Float32 whatever the run's dtype (derivation computes in float32). Thread-safe (one
    derivation at a time; torch spreads each over the cores) and picklable for Dask workers:
    a copy reopens the store and loads the model on its first read.
    """

    def __init__(self, store: Store, run_id: int, side: str, hook: str, device: str | None = None):
        self.location, self.run_id, self.side, self.hook = store.location, run_id, side, hook
        self.device = device
        self._lock = threading.Lock()
        self._reader: Reader | None = None
        self._store: Store | None = store
        reader = self._open()
        self.shape = (reader.n, *self._read(0, 1).shape[1:])
        self.dtype = np.dtype(np.float32)
        self.ndim = len(self.shape)
        self.chunks = (int(reader.run["batch_size"]), *self.shape[1:])

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_lock": None, "_reader": None, "_store": None}

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    def __len__(self) -> int:
        return self.shape[0]

    def _open(self) -> Reader:
        if self._reader is None:
            store = self._store or Store(self.location)
            run = store.run(self.run_id)
            model = model_for_run(run, self.device)
            self._reader = Reader(store, run, model.device, Engine.from_adapter(model))
        return self._reader

    def _read(self, lo: int, hi: int) -> np.ndarray:
        with self._lock:
            values = self._open().tensor(self.side, self.hook, Span(lo, hi))
        return values.cpu().numpy()

    def __getitem__(self, key: Any) -> np.ndarray:
        key = key if isinstance(key, tuple) else (key,)
        rows, rest = key[0], key[1:]
        if isinstance(rows, slice):
            lo, hi, step = rows.indices(self.shape[0])
            if hi <= lo:
                return np.empty((0, *self.shape[1:]), dtype=self.dtype)[(slice(None), *rest)]
            return self._read(lo, hi)[::step][(slice(None), *rest)]
        index = int(rows) % self.shape[0]
        return self._read(index, index + 1)[0][rest]
