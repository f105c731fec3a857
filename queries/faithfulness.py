"""Exact faithfulness of circuits: the metric of a run with edges outside a circuit corrupted.

One `EdgeModel` forward per circuit and prompt batch; the corrupted source outputs and the
endpoints m(model), m(corrupted) (from the stored final logits) are read from the store.
"""

from __future__ import annotations

import numpy as np
import torch

from actstore.errors import ActstoreError
from actstore.store import Store


class Evaluator:
    """Exact metric of circuits over a run: one forward per circuit and batch."""

    def __init__(self, store: Store, run: dict, metric: str, device: str | None = None):
        from actstore.models import load_model
        from queries.edge_batches import check_model, check_run_hooks
        from queries.edge_model import EdgeModel

        self.store, self.run, self.metric = store, run, metric
        self.model = EdgeModel(load_model(run["model"], device))
        check_model(store, run, self.model)
        check_run_hooks(store, run["run_id"], self.model.shape.n_layers)
        self.clean_metric, self.corrupted_metric = self._endpoints()

    def _endpoints(self) -> tuple[float, float]:
        from queries.edge_batches import iter_batches, metric_values

        clean = corrupted = 0.0
        for batch in iter_batches(self.store, self.run, self.model):
            clean += float(metric_values(self.metric, batch.clean_logits, batch).sum())
            corrupted += float(metric_values(self.metric, batch.corrupted_logits, batch).sum())
        n = int(self.run["n_prompts"])
        return clean / n, corrupted / n

    def metric_of(self, masks: list[np.ndarray]) -> list[float]:
        """m(C) for each circuit mask, mean over the run's prompts."""
        from queries.edge_batches import iter_batches, metric_values

        g = self.model.graph
        dev = self.model.adapter.device
        dropped = [torch.as_tensor(g.real & ~m, dtype=torch.float32, device=dev) for m in masks]
        sums = [0.0] * len(masks)
        with torch.no_grad():
            for batch in iter_batches(self.store, self.run, self.model):
                for i, d in enumerate(dropped):
                    run = self.model.run(batch.clean[:, :, 0], batch.last, batch.corrupted, d)
                    sums[i] += float(metric_values(self.metric, run.logits, batch).sum())
        n = int(self.run["n_prompts"])
        return [s / n for s in sums]

    def faithfulness(self, value: float) -> float:
        span = self.clean_metric - self.corrupted_metric
        if abs(span) < 1e-12:
            raise ActstoreError(
                f"run {self.run['run_id']}: clean and corrupted {self.metric} are equal, so "
                "faithfulness is undefined; use a run whose corruption changes the metric"
            )
        return (value - self.corrupted_metric) / span
