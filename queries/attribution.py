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

import sys
import time

import numpy as np
import polars as pl
import torch

from actstore.errors import UsageError
from actstore.results import find_query, record_query
from actstore.store import Store
from queries.edge_batches import (
    EdgeBatch,
    check_metric,
    check_model,
    check_run_hooks,
    iter_batches,
    metric_values,
)
from queries.edge_model import EdgeModel

METHODS = ("atp", "eap", "eap-ig", "eap-ig-activations")
LEVELS = ("node", "edge")
DEFAULT_STEPS = 5


def resolve_params(
    method: str, steps: int | None, level: str | None, metric: str
) -> dict[str, object]:
    """Validated parameters as recorded in `queries.params` (what determines the scores)."""
    if method not in METHODS:
        raise UsageError(f"--method {method}: choose one of {', '.join(METHODS)}")
    check_metric(metric)
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


def compute_scores(
    model: EdgeModel, store: Store, run: dict, params: dict, progress: bool | None = None
) -> np.ndarray:
    """(n_forward, n_backward) scores summed over the run's batches (zero off the edges)."""
    from tqdm import tqdm

    n = int(run["n_prompts"])
    g = model.graph
    total = torch.zeros(g.n_forward, g.n_backward, dtype=torch.float64)
    show = sys.stderr.isatty() if progress is None else progress
    batches = iter_batches(store, run, model)
    n_batches = -(-n // int(run["batch_size"]))
    for batch in tqdm(batches, total=n_batches, disable=not show, file=sys.stderr,
                      desc=f"{params['method']} run {run['run_id']}", unit="batch"):  # fmt: skip
        total += batch_scores(model, batch, params, n).double().cpu()
    return total.numpy()


def batch_scores(model: EdgeModel, batch: EdgeBatch, params: dict, n_total: int) -> torch.Tensor:
    """One batch's contribution to the scores of `params['method']`."""
    method, steps, metric = params["method"], params["steps"], params["metric"]
    clean_in, corrupted_in = batch.clean[:, :, 0], batch.corrupted[:, :, 0]

    def grads(inputs: torch.Tensor, replace: dict | None = None) -> list[torch.Tensor]:
        return _input_grads(model, batch, metric, n_total, inputs, replace)

    g = model.graph
    out = torch.zeros(g.n_forward, g.n_backward, device=clean_in.device)
    if method == "atp":
        _contract(model, out, batch.clean - batch.corrupted, grads(corrupted_in))
        return out
    diff = batch.corrupted - batch.clean
    if method == "eap":
        _contract(model, out, diff, grads(clean_in))
        return out
    alphas = [k / steps for k in range(1, steps + 1)]
    if method == "eap-ig":
        mean = _mean_grads([grads(_lerp(corrupted_in, clean_in, a)) for a in alphas])
        _contract(model, out, diff, mean)
        return out
    for first, rows in _source_groups(model):

        def at(alpha: float, first: int = first, rows: slice = rows) -> list[torch.Tensor]:
            if first == 0:
                return grads(_lerp(corrupted_in, clean_in, alpha))
            mixed = _lerp(batch.corrupted[:, :, rows], batch.clean[:, :, rows], alpha)
            return grads(clean_in, {first: mixed if rows.stop - rows.start > 1 else mixed[:, :, 0]})

        _contract(model, out, diff, _mean_grads([at(a) for a in alphas]), rows)
    return out


def _lerp(start: torch.Tensor, end: torch.Tensor, alpha: float) -> torch.Tensor:
    return start + alpha * (end - start)


def _mean_grads(per_step: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    return [torch.stack(parts).mean(0) for parts in zip(*per_step, strict=True)]


def _source_groups(model: EdgeModel) -> list[tuple[int, slice]]:
    """(first forward index, rows) of each group whose outputs IG-over-activations interpolates."""
    g = model.graph
    groups = [(0, slice(0, 1))]
    for layer in range(model.shape.n_layers):
        first = g.head_index(layer, 0)
        groups += [(first, slice(first, first + model.shape.n_heads))]
        groups += [(g.mlp_index(layer), slice(g.mlp_index(layer), g.mlp_index(layer) + 1))]
    return groups


def _input_grads(
    model: EdgeModel,
    batch: EdgeBatch,
    metric: str,
    n_total: int,
    inputs: torch.Tensor,
    replace: dict | None,
) -> list[torch.Tensor]:
    """∂(mean metric)/∂(every destination input), one forward and one backward."""
    with torch.enable_grad():
        run = model.run(inputs.detach().requires_grad_(True), batch.last, replace=replace)
        value = metric_values(metric, run.logits, batch).sum() / n_total
        found = torch.autograd.grad(value, run.inputs, allow_unused=True)
    # an input whose node's outputs are replaced (IG over activations) has no gradient
    return [torch.zeros_like(x) if g is None else g for g, x in zip(found, run.inputs, strict=True)]


def _contract(
    model: EdgeModel,
    out: torch.Tensor,
    diff: torch.Tensor,
    grads: list[torch.Tensor],
    rows: slice | None = None,
) -> None:
    """out[s, d] += Σ_{batch, pos} diff_s · grad_d over the edges (s upstream of d)."""
    g = model.graph
    for cols, grad in zip(model.input_slices(), grads, strict=True):
        n_up = int(g.n_upstream[cols.start])
        src = slice(0, n_up) if rows is None else rows
        if src.start >= n_up:
            continue
        out[src, cols] += torch.einsum("bpsd,bpnd->sn", diff[:, :, src], grad)
