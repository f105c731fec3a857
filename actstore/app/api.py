"""The Python API: a Store with every verb of the CLI, each returning a polars DataFrame.

Like `cli.py` and `demo.py`, this module composes the three packages (it is a composition root):
the analysis verbs import `ingest` and `queries` lazily, so reading a store never imports torch.
Every verb names its run `run`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import polars as pl

from actstore.core.store import Store


class ActStore(Store):
    """`actstore.open(path)`: read verbs from Store, plus ingest and the queries."""

    def ingest(self, **kwargs: Any) -> pl.DataFrame:
        """Ingest a task or dataset into this store (see `ingest.runner.ingest`)."""
        from ingest.runner import ingest

        return ingest(self, **kwargs)

    def merge(self) -> pl.DataFrame:
        """Fold sharded ingests' manifests into the catalog (see `ingest.shards.merge`)."""
        from ingest.shards import merge

        return merge(self)

    def read(
        self,
        run: int,
        side: str,
        hook: str,
        start: int = 0,
        stop: int | None = None,
        derive: bool = False,
    ) -> np.ndarray:
        """Activations of prompts [start, stop), every chunk verified; with `derive`, a hook the
        run derives on read (the default hooks store a lean set) is computed from the stored
        ones with the run's model, as the queries do (float32)."""
        if derive and self.derives(run, side, hook):
            from queries.core.reader import DerivedArray

            return DerivedArray(self, run, side, hook)[start:stop]
        return super().read(run, side, hook, start, stop)

    def subspace(self, run: int, hook: str, basis: str, **kwargs: Any) -> pl.DataFrame:
        """Subspace patching with illusion diagnostics (see `queries.subspace.query`)."""
        from queries.subspace import subspace

        return subspace(self, run, hook, basis, **kwargs)

    def attention(self, run: int, **kwargs: Any) -> pl.DataFrame:
        """Per head, mean attention from one role to others (see `queries.attention.query`)."""
        from queries.attention import attention

        return attention(self, run, **kwargs)

    def heads(self, run: int, **kwargs: Any) -> pl.DataFrame:
        """Per head, previous-token, duplicate-token and induction scores
        (see `queries.attention.heads`)."""
        from queries.attention import head_scores

        return head_scores(self, run, **kwargs)

    def reduce(self, run: int, hook: str, op: str = "mean", **kwargs: Any) -> pl.DataFrame:
        """Out-of-core mean / class-mean / head-norm over prompts (`queries.reduction.reduce`)."""
        from queries.reduction.reduce import reduce

        return reduce(self, run, hook, op, **kwargs)

    # ---- analysis: overlap and plots ---------------------------------------------------------

    def overlap(
        self,
        runs: list[int] | None = None,
        by: str = "head",
        top_k: int | None = None,
        top_frac: float | None = None,
        circuits: bool = False,
        queries: list[int] | None = None,
        **filters: Any,
    ) -> pl.DataFrame:
        """Overlap statistics of the runs' head or edge sets, like with like: from the given
        source ids (`queries`) or each run's source of the setting they share
        (`queries.analysis.overlap`).
        """
        from queries.analysis.overlap import choose, overlap

        return overlap(self, runs, choose(by, top_k, top_frac, circuits), queries, **filters)

    def plot(self, kind: str, ident: str, out: str, **options: Any) -> pl.DataFrame:
        """Write a PNG: `effects` (patch query id), `overlap` (runs '1,2,…'), `faithfulness`
        (score id); returns the plotted rows."""
        from queries.analysis.plot import plot

        return plot(self, kind, ident, out, **options)

    def report(self, out: str, runs: list[int] | None = None, **options: Any) -> pl.DataFrame:
        """Write one self-contained interactive HTML page about the store (or the runs); returns
        one row per chart (see `queries.analysis.report`). Options: top_k, top_frac (head sets),
        edge_top_k, edge_top_frac (edge sets) for the overlap matrices."""
        from queries.analysis.report import report

        return report(self, out, runs, **options)

    def verify(self, run: int | None = None) -> pl.DataFrame:
        """Damaged or missing chunks and prompts, by run, side, hook and chunk (see verify.py)."""
        from actstore.core.verify import verify

        return verify(self, run)

    def repair(self, run: int | None = None, device: str | None = None) -> pl.DataFrame:
        """Recompute damaged chunks from the run's recorded parameters (needs the model)."""
        from ingest.repair import repair

        return repair(self, run, device)

    # ---- attribution and circuits (queries/attribution) ------------------------------------

    def attribute(
        self,
        run: int,
        method: str,
        steps: int | None = None,
        level: str | None = None,
        metric: str = "logit-diff",
        device: str | None = None,
        progress: bool | None = None,
        workers: int | None = None,
        scheduler: str | None = None,
        recompute: bool = False,
    ) -> pl.DataFrame:
        """AtP node scores or EAP / EAP-IG edge scores of a run, by |score| descending; with
        `workers` (a local Dask cluster) or `scheduler` (a running one's address) the prompt
        batches run as Dask tasks."""
        from queries.attribution import attribute

        return attribute(self, run, method, steps, level, metric, device, progress, workers,
                         scheduler, recompute)  # fmt: skip

    def circuit(
        self,
        scores: int,
        edges: int | str | Sequence[int | str] | None = None,
        faithfulness: float | None = None,
        prune: bool = True,
        device: str | None = None,
        workers: int | None = None,
        scheduler: str | None = None,
        metric: str | None = None,
        recompute: bool = False,
    ) -> pl.DataFrame:
        """A circuit from an edge score set (top-N, "all", a curve of such sizes in one pass, or
        the smallest reaching a faithfulness), its faithfulness in the scores' metric or
        `metric`; with `workers` or `scheduler` its faithfulness measurements run as Dask
        tasks."""
        from queries.attribution import circuit

        return circuit(self, scores, edges, faithfulness, prune, device, workers, scheduler,
                       metric, recompute)  # fmt: skip

    def intervene(self, run: int, heads: str, attend: str, **kwargs: Any) -> pl.DataFrame:
        """Metric and accuracy before and after an attention intervention (see
        `queries.paths.intervene`)."""
        from queries.paths.intervene import intervene

        return intervene(self, run, heads, attend, **kwargs)

    def patch(self, run: int, component: str, **kwargs: Any) -> pl.DataFrame:
        """Activation patching effects of a run (see `queries.patching.patch`)."""
        from queries.patching import patch

        return patch(self, run, component, **kwargs)
