"""Activations as the queries see them: through the one Reader, which returns a hook the run
stores as stored and derives the others (a run with the default hooks stores the lean set)."""

from __future__ import annotations

import torch

from actstore.core.store import Store
from actstore.model.adapter import ModelAdapter


def read_hook(
    store: Store, run_id: int, side: str, hook: str, model: ModelAdapter | None = None
) -> torch.Tensor:
    """Every prompt's (side, hook) of the run as float32, stored or derived with `model`
    (default: the run's own, loaded on the CPU)."""
    from queries.core.engine import Engine
    from queries.core.reader import Reader, Span
    from queries.core.run_model import model_for_run

    with store.reading(), torch.no_grad():
        run = store.run(run_id)
        model = model_for_run(run, "cpu", model)
        reader = Reader(store, run, "cpu", Engine.from_adapter(model))
        return reader.tensor(side, hook, Span(0, reader.n))
