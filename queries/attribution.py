"""Gradient attribution over the edge graph: AtP (nodes), EAP and EAP-IG (edges).

Every method is a first-order estimate: score(s -> d) = Δ_s · ∂m/∂input_d, with Δ_s the
difference of source s's output between the two runs, read from the store, and the gradient
taken in forwards that `EdgeModel` runs (one forward+backward per gradient point, nothing else):

- `eap`: Δ = corrupted − clean, gradient at the clean run (one pass per batch). Estimates
  m(edge corrupted) − m(clean): noising, as in Syed et al. and Hanna et al.
- `eap-ig`: as eap, gradient averaged over the inputs corrupted + (k/S)·(clean − corrupted),
  k = 1..S (Hanna et al.'s integrated gradients over the input embeddings; S passes; S=1 is eap).
- `eap-ig-activations`: the IG variant over intermediate activations: for each source group
  (input, a layer's heads, a layer's MLP) its outputs are set to corrupted + (k/S)·(clean −
  corrupted) in the clean forward, and the gradients of those S passes score that group's edges.
- `atp`: Δ = clean − corrupted, gradient at the corrupted run: the denoising estimate of
  m(corrupted with a clean) − m(corrupted), the direction of `actstore patch`'s default.

Level `node` sums a node's outgoing edge scores, which equals Δ_s · ∂m/∂out_s (its output feeds
every downstream input additively): node AtP for heads and MLPs. Node rows have dst NULL.
The metric is the mean over prompts, so scores are in metric units per prompt.
"""

from __future__ import annotations

import time

import polars as pl

from actstore.errors import UsageError
from actstore.results import find_query, record_query
from actstore.store import Store
from queries.metrics import METRICS

METHODS = ("atp", "eap", "eap-ig", "eap-ig-activations")
LEVELS = ("node", "edge")
DEFAULT_STEPS = 5


def resolve_params(
    method: str, steps: int | None, level: str | None, metric: str
) -> dict[str, object]:
    """Validated parameters as recorded in `queries.params` (what determines the scores)."""
    if method not in METHODS:
        raise UsageError(f"--method {method}: choose one of {', '.join(METHODS)}")
    if metric not in METRICS:
        raise UsageError(f"--metric {metric}: choose one of {', '.join(METRICS)}")
    integrated = method.startswith("eap-ig")
    if steps is not None and not integrated:
        raise UsageError(f"--steps applies to eap-ig methods only, not {method}")
    if steps is not None and steps < 1:
        raise UsageError(f"--steps {steps}: need at least 1")
    level = level or ("node" if method == "atp" else "edge")
    if level not in LEVELS:
        raise UsageError(f"--level {level}: choose node or edge")
    return {
        "method": method,
        "steps": (steps or DEFAULT_STEPS) if integrated else None,
        "level": level,
        "metric": metric,
    }


def attribute(
    store: Store,
    run_id: int,
    method: str,
    steps: int | None = None,
    level: str | None = None,
    metric: str = "logit-diff",
    device: str | None = None,
    progress: bool | None = None,
) -> pl.DataFrame:
    """Score a run's edges (or nodes); recorded as an `attribute` query, rows by |score| desc."""
    params = resolve_params(method, steps, level, metric)
    found = find_query(store, "attribute", run_id, params)
    if found is not None:
        return stored_scores(store, found)
    run = store.run(run_id)
    from actstore.models import load_model
    from queries.edge_batches import check_model, check_run_hooks
    from queries.edge_gradients import compute_scores
    from queries.edge_model import EdgeModel

    model = EdgeModel(load_model(run["model"], device))
    check_model(store, run, model)
    check_run_hooks(store, run_id, model.shape.n_layers)
    started = time.perf_counter()
    scores = compute_scores(model, store, run, params, progress)
    wall = time.perf_counter() - started
    g = model.graph
    if params["level"] == "node":
        frame = g.node_frame((scores * g.real).sum(1))
    else:
        frame = g.edge_frame(scores)
    frame = frame.select(
        pl.lit(run_id, dtype=pl.Int32).alias("run_id"), pl.lit(method).alias("method"), pl.all()
    )
    score_id = record_query(store, "attribute", run_id, params, wall, {"edge_scores": frame})
    return stored_scores(store, score_id)


def stored_scores(store: Store, score_id: int) -> pl.DataFrame:
    return store.query(
        "SELECT * FROM edge_scores WHERE score_id = ? ORDER BY abs(score) DESC, src, dst, qkv",
        [score_id],
    )
