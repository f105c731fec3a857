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
- `exact`: no estimate: m(clean run with that one edge carrying its corrupted value) − m(clean),
  every edge patched alone (queries/attribution/exact.py), the quantity eap and eap-ig
  approximate; the view `score_agreement` compares any two score sets of a run.

Level `node` sums a node's outgoing edge scores, which equals Δ_s · ∂m/∂out_s (its output feeds
every downstream input additively): node AtP for heads and MLPs. Node rows have dst NULL.
The metric is the mean over prompts, so scores are in metric units per prompt.
"""

from __future__ import annotations

import polars as pl

from actstore.core.choices import GRADIENT_METRICS, LEVELS, METHODS, METRICS, check
from actstore.core.errors import UsageError
from actstore.core.runtime import Runtime
from actstore.core.store import Store
from queries.core.recorded import recorded
from queries.core.sweep import check_cluster, cluster

DEFAULT_STEPS = 5
MAX_STEPS = 1000


def resolve_params(
    method: str, steps: int | None, level: str | None, metric: str
) -> dict[str, object]:
    """Validated parameters as recorded in `queries.params` (what determines the scores)."""
    check("--method", method, METHODS)
    check("--metric", metric, METRICS)
    if metric not in GRADIENT_METRICS:
        raise UsageError(
            f"--metric {metric}: attribution follows the metric's gradient and {metric} has none "
            f"(it is a step function); use {', '.join(GRADIENT_METRICS)}, or patch / circuit "
            f"--metric {metric} for exact effects"
        )
    integrated = method.startswith("eap-ig")
    if steps is not None and not integrated:
        raise UsageError(f"--steps applies to eap-ig methods only, not {method}")
    if steps is not None and not 1 <= steps <= MAX_STEPS:
        raise UsageError(
            f"--steps {steps}: give 1 to {MAX_STEPS} integration steps (EAP-IG converges in tens; "
            "each step is a forward and backward pass of every batch)"
        )
    level = level or ("node" if method == "atp" else "edge")
    check("--level", level, LEVELS)
    if method == "exact" and level != "edge":
        raise UsageError(
            "--method exact scores edges only (a node's outgoing edges patched one at a time do "
            "not sum to patching the node); drop --level node or use actstore patch"
        )
    return {
        "method": method,
        "steps": (steps or DEFAULT_STEPS) if integrated else None,
        "level": level,
        "metric": metric,
    }


def attribute(
    store: Store,
    run: int,
    method: str,
    steps: int | None = None,
    level: str | None = None,
    metric: str = "logit-diff",
    recompute: bool = False,
    runtime: Runtime = Runtime(),
) -> pl.DataFrame:
    """Score a run's edges (or nodes); recorded as an `attribute` query, rows by |score| desc.

    With the runtime's `workers` or `scheduler` the run's batches are Dask tasks
    (queries/core/sweep.py); the query is recorded the same, whatever the cluster.
    """
    params = resolve_params(method, steps, level, metric)
    check_cluster(runtime)

    def compute() -> dict[str, pl.DataFrame]:
        from queries.attribution.edge_batches import check_run
        from queries.attribution.edge_model import EdgeModel
        from queries.attribution.gradients import compute_scores
        from queries.core.run_model import model_for_run

        info = store.run(run)
        model = EdgeModel(model_for_run(info, runtime.device))
        check_run(store, info, model)
        with cluster(runtime) as client:
            scores = compute_scores(model, store, info, params, runtime, client)
        g = model.graph
        if params["level"] == "node":
            frame = g.node_frame((scores * g.real).sum(1))
        else:
            frame = g.edge_frame(scores)
        frame = frame.select(
            pl.lit(run, dtype=pl.Int32).alias("run_id"), pl.lit(method).alias("method"), pl.all()
        )
        return {"edge_scores": frame}

    return recorded(store, "attribute", run, params, compute,
                    lambda score_id: stored_scores(store, score_id), recompute)  # fmt: skip


def stored_scores(store: Store, score_id: int) -> pl.DataFrame:
    return store._trusted_query(
        "SELECT * FROM edge_scores WHERE score_id = ? ORDER BY abs(score) DESC, src, dst, qkv",
        [score_id],
    )
