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

    def patch(self, run_id: int, component: str, **kwargs: Any) -> pl.DataFrame:
        """Activation patching effects of a run (see `queries.patching.patch`)."""
        from queries.patching import patch

        return patch(self, run_id, component, **kwargs)
