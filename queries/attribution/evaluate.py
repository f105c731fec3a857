"""Exact faithfulness of circuits: the metric of a run with edges outside a circuit corrupted.

Each prompt batch is read once and every circuit asked for is tree-patched on it
(queries/attribution/tree.py: the dense `EdgeModel` forward's numbers, computing only the nodes
the circuit changes); the clean and corrupted node outputs and the endpoints m(model),
m(corrupted) (from the stored final logits) are read from the store. For a `--faithfulness`
search, which measures a dozen sizes one after another, the batches laid out for tree patching
stay in memory (in one process, up to `KEEP_BYTES`), so it reads each of them once. With a Dask
client each prompt batch is a task measuring every circuit asked for at once, and the batches'
sums are added in batch order (queries/core/sweep.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from actstore.core.errors import ActstoreError
from actstore.core.runtime import Runtime
from actstore.core.store import Store
from actstore.model.metrics import Targets, endpoints, from_logits, normalized
from queries.attribution.edge_batches import check_run, edge_reader, open_run, read_batch
from queries.attribution.edge_model import EdgeModel
from queries.attribution.tree import TreeBatch, TreePatcher
from queries.core.reader import Reader, Span
from queries.core.run_model import model_for_run
from queries.core.sweep import in_order

# Bytes of prompt batches laid out for tree patching that an Evaluator keeps between
# measurements; batches past it are read from the store again for each measurement.
KEEP_BYTES = 2 << 30
# Bytes that the circuits tree-patched side by side in one forward may take (each holds its
# copy of the batch's Δ rows, about as much again in destination inputs).
GROUP_BYTES = 1 << 30


class Evaluator:
    """Exact metric of circuits over a run: each batch read once, the circuits tree-patched on
    it side by side in as few forwards as memory allows."""

    def __init__(
        self,
        store: Store,
        run: dict,
        metric: str,
        runtime: Runtime = Runtime(),
        client: Any = None,
        keep: bool = False,
    ):
        """`keep`: measurements will follow one another (a search), so keep the batches read
        (in this process, up to `KEEP_BYTES`) instead of reading them again for each."""
        self.store, self.run, self.metric = store, run, metric
        self.device, self.client = runtime.device, client
        self.keep = keep and client is None
        self.model = EdgeModel(model_for_run(run, runtime.device))
        check_run(store, run, self.model)
        self.reader = edge_reader(store, run, self.model)
        self.spans = list(self.reader.spans())
        self.patcher = TreePatcher(self.model)
        self.kept: dict[int, tuple[TreeBatch, Targets, torch.Tensor]] = {}
        self.kept_bytes = 0
        self.clean_metric, self.corrupted_metric = self._endpoints()

    def _prepared(self, index: int) -> tuple[TreeBatch, Targets, torch.Tensor]:
        """Span `index` laid out for tree patching, its targets and corrupted final logits: kept
        from an earlier measurement, or read (and kept while `KEEP_BYTES` allows)."""
        if index in self.kept:
            return self.kept[index]
        batch = read_batch(self.reader, self.spans[index], self.model)
        with torch.no_grad():
            tree = self.patcher.batch(batch.clean, batch.corrupted, batch.last)
        prepared = (tree, batch.targets, batch.corrupted_logits)
        if self.keep and self.kept_bytes + tree.nbytes <= KEEP_BYTES:
            self.kept[index] = prepared
            self.kept_bytes += tree.nbytes
        return prepared

    def _endpoints(self) -> tuple[float, float]:
        clean = corrupted = 0.0
        with torch.no_grad():
            for index, span in enumerate(self.spans):
                if self.keep:  # the batches the circuits will read, kept for them
                    _, t, logits = self._prepared(index)
                else:  # the stored (or derived) final logits only
                    t = self.reader.targets(span)
                    logits = self.reader.tensor("corrupted", "logits", span)
                c, k = endpoints(self.metric, t, logits)
                clean, corrupted = clean + c, corrupted + k
        n = int(self.run["n_prompts"])
        return clean / n, corrupted / n

    def metric_of(self, masks: list[np.ndarray]) -> list[float]:
        """m(C) for each circuit mask, mean over the run's prompts."""

        def local(index: int) -> list[float]:
            tree, targets, _ = self._prepared(index)
            return _tree_metrics(self.patcher, tree, targets, self.metric, masks)

        sums = [0.0] * len(masks)
        items = range(len(self.spans)) if self.client is None else self.spans
        parts = in_order(self.client, local, _span_task, items, self.store.location,
                         self.run["run_id"], self.metric, masks, self.device)  # fmt: skip
        for part in parts:  # in batch order: a fixed order of sums
            sums = [s + p for s, p in zip(sums, part, strict=True)]
        n = int(self.run["n_prompts"])
        return [s / n for s in sums]

    def faithfulness(self, value: float) -> float:
        norm = normalized(value, self.clean_metric, self.corrupted_metric, tol=1e-12)
        if norm is None:
            raise ActstoreError(
                f"run {self.run['run_id']}: clean and corrupted {self.metric} are equal, so "
                "faithfulness is undefined; use a run whose corruption changes the metric"
            )
        return norm


def _tree_metrics(
    patcher: TreePatcher, tree: TreeBatch, targets: Targets, metric: str, masks: list[np.ndarray]
) -> list[float]:
    """The metric summed over one batch's prompts, per circuit mask: the circuits side by side
    along the batch axis, as many per forward as `GROUP_BYTES` allows."""
    group = max(1, GROUP_BYTES // (2 * tree.delta_clean.nbytes))  # Δ rows and inputs per circuit
    sums = []
    with torch.no_grad():
        for at in range(0, len(masks), group):
            for logits in patcher.logits_many(tree, masks[at : at + group]):
                sums.append(float(from_logits(metric, logits, targets).sum()))
    return sums


def _span_metrics(
    model: EdgeModel, reader: Reader, span: Span, metric: str, masks: list[np.ndarray]
) -> list[float]:
    """The metric summed over the span's prompts, per circuit mask: the batch is read once and
    every circuit is tree-patched on it (queries/attribution/tree.py)."""
    batch = read_batch(reader, span, model)
    patcher = TreePatcher(model)
    with torch.no_grad():
        tree = patcher.batch(batch.clean, batch.corrupted, batch.last)
    return _tree_metrics(patcher, tree, batch.targets, metric, masks)


def _span_task(
    span: Span, location: str, run_id: int, metric: str, masks: list[np.ndarray],
    device: str | None,
) -> list[float]:  # fmt: skip
    """One batch's sums for every mask, on a Dask worker."""
    model, reader = open_run(location, run_id, device)
    return _span_metrics(model, reader, span, metric, masks)
