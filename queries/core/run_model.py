"""The model a run was ingested with: loaded once per process and checked against the run.

Every query that computes loads the run's model here, so each refuses the same way a model whose
weights differ from the ingested run's (the run records the model's fingerprint).
"""

from __future__ import annotations

import functools

from actstore.core.errors import ActstoreError
from actstore.model.adapter import ModelAdapter, load_model
from actstore.model.converted import load_converted, save_converted


@functools.lru_cache(maxsize=1)
def _load(spec: str, device: str | None, fingerprint: str | None) -> ModelAdapter:
    """The last model stays loaded: repeated queries in one session skip the load. A model
    converted before (actstore/model/converted.py) loads from its file without TransformerLens
    or transformers; any other loads through the bridge and is converted for next time."""
    if fingerprint:
        converted = load_converted(fingerprint, device, spec)
        if converted is not None:
            return converted  # type: ignore[return-value]  # what queries use of an adapter
    model = load_model(spec, device)
    save_converted(model)
    return model


def model_for_run(
    run: dict, device: str | None = None, model: ModelAdapter | None = None
) -> ModelAdapter:
    """`model`, or the run's model loaded on `device`, once its fingerprint matches the run's."""
    if model is None:
        model = _load(run["model"], device, run["params"].get("fingerprint"))
    expected = run["params"].get("fingerprint")
    if expected and model.fingerprint != expected:
        raise ActstoreError(
            f"model {model.spec!r} differs from the one run {run['run_id']} was ingested with "
            f"({run['model']!r}); query with that model or re-ingest the run"
        )
    return model
