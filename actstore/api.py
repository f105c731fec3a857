"""The Python API: a Store with every verb of the CLI, each returning a polars DataFrame.

Like `cli.py`, this module composes the three packages (it is a composition root): the analysis
verbs import `ingest` and `queries` lazily, so reading a store never imports torch.
"""

from __future__ import annotations

from typing import Any

import polars as pl

from actstore.store import Store


class ActStore(Store):
    """`actstore.open(path)`: read verbs from Store, plus ingest and the queries."""

    def ingest(self, **kwargs: Any) -> pl.DataFrame:
        """Ingest a task or dataset into this store (see `ingest.runner.ingest`)."""
        from ingest.runner import ingest

        return ingest(self.path, **kwargs)

    def verify(self, run: int | None = None) -> pl.DataFrame:
        """Damaged or missing chunks and prompts, by run, side, hook and chunk (see verify.py)."""
        from actstore.verify import verify

        return verify(self, run)

    def repair(self, run: int | None = None, device: str | None = None) -> pl.DataFrame:
        """Recompute damaged chunks from the run's recorded parameters (needs the model)."""
        from ingest.repair import repair

        return repair(self.path, run, device)
