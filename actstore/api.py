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

    # ---- attribution and circuits (queries/attribution.py, queries/circuits.py) ----------

    def attribute(
        self,
        run: int,
        method: str,
        steps: int | None = None,
        level: str | None = None,
        metric: str = "logit-diff",
        device: str | None = None,
        progress: bool | None = None,
    ) -> pl.DataFrame:
        """AtP node scores or EAP / EAP-IG edge scores of a run, by |score| descending."""
        from queries.attribution import attribute

        return attribute(self, run, method, steps, level, metric, device, progress)

    def circuit(
        self,
        scores: int,
        edges: int | None = None,
        faithfulness: float | None = None,
        prune: bool = True,
        device: str | None = None,
    ) -> pl.DataFrame:
        """A circuit from an edge score set (top-N or smallest reaching a faithfulness)."""
        from queries.circuits import circuit

        return circuit(self, scores, edges, faithfulness, prune, device)
