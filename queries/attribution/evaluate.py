"""Exact faithfulness of circuits: the metric of a run with edges outside a circuit corrupted.

One `EdgeModel` forward per circuit and prompt batch; the corrupted source outputs and the
endpoints m(model), m(corrupted) (from the stored final logits) are read from the store.
"""

from __future__ import annotations

import numpy as np
import torch

from actstore.errors import ActstoreError
from actstore.store import Store
from queries.attribution.batches import check_run, iter_batches
from queries.attribution.model import EdgeModel
from queries.core.metrics import endpoints, from_logits, normalized
from queries.core.model import model_for_run


class Evaluator:
    """Exact metric of circuits over a run: one forward per circuit and batch."""

    def __init__(self, store: Store, run: dict, metric: str, device: str | None = None):
        self.store, self.run, self.metric = store, run, metric
        self.model = EdgeModel(model_for_run(run, device))
        check_run(store, run, self.model)
        self.clean_metric, self.corrupted_metric = self._endpoints()

    def _endpoints(self) -> tuple[float, float]:
        clean = corrupted = 0.0
        for batch in iter_batches(self.store, self.run, self.model):
            c, k = endpoints(self.metric, batch.targets, batch.corrupted_logits)
            clean, corrupted = clean + c, corrupted + k
        n = int(self.run["n_prompts"])
        return clean / n, corrupted / n

    def metric_of(self, masks: list[np.ndarray]) -> list[float]:
        """m(C) for each circuit mask, mean over the run's prompts."""
        g = self.model.graph
        dev = self.model.adapter.device
        dropped = [torch.as_tensor(g.real & ~m, dtype=torch.float32, device=dev) for m in masks]
        sums = [0.0] * len(masks)
        with torch.no_grad():
            for batch in iter_batches(self.store, self.run, self.model):
                for i, d in enumerate(dropped):
                    run = self.model.run(batch.clean[:, :, 0], batch.last, batch.corrupted, d)
                    sums[i] += float(from_logits(self.metric, run.logits, batch.targets).sum())
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
