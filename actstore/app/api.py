"""The Python API: a Store with every verb of the CLI, each returning a polars DataFrame.

Like `cli.py` and `demo.py`, this module composes the three packages (it is a composition root):
the analysis verbs import `ingest` and `queries` lazily, so reading a store never imports torch.
Every verb names its run `run`; its parameters are the CLI's options (`--batch-size` is
`batch_size`), and where it runs is one `Runtime` (device, progress, workers, scheduler:
actstore/core/runtime.py), given as `runtime=` like the CLI's shared options. A verb that
computes (ingest, repair, the queries) is the function itself bound to the store (`Verb`): its
signature, defaults and docstring are written once, in its own module.
"""

from __future__ import annotations

import importlib
import types
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import polars as pl

from actstore.core.store import Store

if TYPE_CHECKING:
    pass


class Verb:
    """A function `module.name(store, ...)` as a method of the store: imported on first use (so
    reading a store never imports torch) and bound to the store as its first argument, with
    nothing in between: `help(store.patch)` shows the query's own signature."""

    def __init__(self, module: str, name: str):
        self.module, self.name = module, name

    def __get__(self, store: Store | None, owner: type | None = None) -> Any:
        function = getattr(importlib.import_module(self.module), self.name)
        return function if store is None else types.MethodType(function, store)


class ActStore(Store):
    """`actstore.open(path)`: read verbs from Store, plus ingest and the queries."""

    # ---- ingest: the ingest stage's own functions, bound to this store (a Store shares its
    # writer lock, so they work inside `with store.writer():`) ---------------------------------

    ingest = Verb("ingest.runner", "ingest")
    merge = Verb("ingest.shards", "merge")
    repair = Verb("ingest.repair", "repair")

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

    # ---- analysis: overlap and plots ---------------------------------------------------------

    def overlap(
        self,
        runs: list[int] | None = None,
        by: str = "head",
        top_k: int | None = None,
        top_frac: float | None = None,
        circuits: bool = False,
        queries: list[int] | None = None,
        metric: str | None = None,
        component: str | None = None,
        direction: str | None = None,
        window: int | None = None,
        method: str | None = None,
    ) -> pl.DataFrame:
        """Overlap statistics of the runs' head or edge sets, like with like: from the given
        source ids (`queries`) or each run's source of the setting they share, narrowed by
        metric, component, direction, window or method (`queries.analysis.overlap`).
        """
        from queries.analysis.overlap import choose, overlap

        return overlap(self, runs, choose(by, top_k, top_frac, circuits), queries, metric=metric,
                       component=component, direction=direction, window=window,
                       method=method)  # fmt: skip

    def plot(
        self,
        kind: str,
        ident: str,
        out: str | Path,
        by: str = "head",
        top_k: int | None = None,
        top_frac: float | None = None,
        circuits: bool = False,
        queries: list[int] | None = None,
        metric: str | None = None,
        component: str | None = None,
        direction: str | None = None,
        window: int | None = None,
        method: str | None = None,
    ) -> pl.DataFrame:
        """Write a PNG: `effects` (patch query id), `overlap` (runs '1,2,…', the sets chosen as
        in `overlap`), `faithfulness` (score id); returns the plotted rows."""
        from queries.analysis.plot import plot

        return plot(self, kind, ident, out, by, top_k, top_frac, circuits, queries, metric=metric,
                    component=component, direction=direction, window=window,
                    method=method)  # fmt: skip

    def verify(self, run: int | None = None) -> pl.DataFrame:
        """Damaged or missing chunks and prompts, by run, side, hook and chunk (see verify.py)."""
        from actstore.core.verify import verify

        return verify(self, run)

    # ---- the queries: each the query function itself, bound to this store -----------------

    patch = Verb("queries.patching", "patch")
    subspace = Verb("queries.subspace", "subspace")
    attention = Verb("queries.attention", "attention")
    heads = Verb("queries.attention", "head_scores")
    reduce = Verb("queries.reduction.reduce", "reduce")
    attribute = Verb("queries.attribution", "attribute")
    circuit = Verb("queries.attribution", "circuit")
    path_patch = Verb("queries.paths", "path")  # Store.path is the store's directory
    intervene = Verb("queries.paths.intervene", "intervene")
    report = Verb("queries.analysis.report", "report")
