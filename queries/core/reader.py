"""The one reader of a run's stored arrays: prompt spans in, tensors out, for every query family.

Patching, attribution, circuits and subspace patching all read through a `Reader`: it walks the
run's prompts in spans (the run's ingest batches by default, so memory is bounded by one span),
and `tensor` is the single place where a stored array becomes a tensor. What a query needs
beyond the arrays (final positions, answers, the stored clean logits a metric compares with)
comes from the run's prompts table, read once.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from actstore.errors import UsageError
from actstore.store import Store
from queries.core.metrics import AnswerSets, Targets, answer_arrays


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

    def __init__(self, store: Store, run: int | dict, device: str | torch.device):
        self.store = store
        self.run = store.run(run) if isinstance(run, int) else run
        self.run_id = int(self.run["run_id"])
        self.device = device
        self.prompts = store.prompts(self.run_id)
        self.n = self.prompts.height
        cols = ("seq_len", "answer_token", "wrong_answer_token")
        self.columns = {c: np.asarray(self.prompts[c].to_numpy(), dtype=np.int64) for c in cols}
        self.sets = answer_arrays(self.prompts)

    def require(self, hooks: Iterable[str], what: str) -> None:
        """Refuse before any work when a side lacks a hook that `what` reads."""
        for side in ("clean", "corrupted"):
            stored = set(self.store.hooks(self.run_id, side))
            missing = [h for h in hooks if h not in stored]
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
        for lo in range(0, self.n, step):
            hi = min(self.n, lo + step)
            if picked is None:
                yield Span(lo, hi)
                continue
            rows = picked[(picked >= lo) & (picked < hi)]
            if len(rows):
                yield Span(lo, hi, rows)

    def tensor(
        self, side: str, hook: str, span: Span, dtype: torch.dtype = torch.float32
    ) -> torch.Tensor:
        """The stored array (side, hook) of the span's prompts: every array read passes here."""
        data = self.store.read(self.run_id, side, hook, span.lo, span.hi)
        if span.rows is not None:
            data = data[span.rows - span.lo]
        return torch.as_tensor(np.asarray(data), device=self.device).to(dtype)

    def column(self, name: str, span: Span) -> torch.Tensor:
        """A prompts column ("seq_len", "answer_token", "wrong_answer_token") as token ids."""
        return torch.as_tensor(self.columns[name][span.index], dtype=torch.long, device=self.device)

    def finals(self, span: Span) -> torch.Tensor:
        """Each prompt's final position."""
        return self.column("seq_len", span) - 1

    def targets(self, span: Span) -> Targets:
        """What the metrics compare against: answers, answer sets and the stored clean logits."""
        sets = {k: v[span.index] for k, v in self.sets.items()}
        return Targets(
            self.column("answer_token", span),
            self.column("wrong_answer_token", span),
            self.tensor("clean", "logits", span),
            AnswerSets.from_arrays(sets, 0, span.size, self.device),
        )
