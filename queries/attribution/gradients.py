"""The gradient passes behind `queries.attribution.attribute` (see its docstring for the methods),
and the batch loop that the exact method (queries/attribution/exact.py) shares with them.

Every score is Δ_s · ∂m/∂input_d summed over prompts and positions; the gradients come from
`EdgeModel` forwards (one forward+backward per gradient point), the Δs from the store.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from actstore.core.output import progress_bar
from actstore.core.runtime import Runtime
from actstore.core.store import Store
from actstore.model.metrics import from_logits
from queries.attribution.edge_batches import EdgeBatch, edge_reader, open_run, read_batch
from queries.attribution.edge_model import EdgeModel
from queries.attribution.exact import exact_scores
from queries.core.reader import Reader, Span
from queries.core.sweep import in_order


def compute_scores(
    model: EdgeModel,
    store: Store,
    run: dict,
    params: dict,
    runtime: Runtime = Runtime(),
    client: Any = None,
) -> np.ndarray:
    """(n_forward, n_backward) scores summed over the run's batches (zero off the edges), in
    batch order; with a Dask `client` (`sweep.cluster`) each batch is a task."""
    n = int(run["n_prompts"])
    g = model.graph
    total = np.zeros((g.n_forward, g.n_backward))
    reader = edge_reader(store, run, model)
    spans = list(reader.spans())

    def local(span: Span) -> np.ndarray:
        return _span_scores(model, reader, span, params, n)

    bar = progress_bar(runtime.progress, total=len(spans), unit="batch",
                       desc=f"{params['method']} run {run['run_id']}")  # fmt: skip
    parts = in_order(client, local, _span_task, spans, store.location, run["run_id"], params, n,
                     runtime.device, done=lambda: bar.update(1))  # fmt: skip
    for part in parts:  # in batch order: a fixed order of sums
        total += part
    bar.close()
    return total


def _span_scores(
    model: EdgeModel, reader: Reader, span: Span, params: dict, n_total: int
) -> np.ndarray:
    scores = batch_scores(model, read_batch(reader, span, model), params, n_total)
    return scores.double().cpu().numpy()


def _span_task(
    span: Span, location: str, run_id: int, params: dict, n_total: int, device: str | None
) -> np.ndarray:
    """One batch's scores, on a Dask worker."""
    model, reader = open_run(location, run_id, device)
    return _span_scores(model, reader, span, params, n_total)


def batch_scores(model: EdgeModel, batch: EdgeBatch, params: dict, n_total: int) -> torch.Tensor:
    """One batch's contribution to the scores of `params['method']` (`exact`: the edges
    patched one at a time, queries/attribution/exact.py)."""
    method, steps, metric = params["method"], params["steps"], params["metric"]
    if method == "exact":
        return exact_scores(model, batch, metric, n_total)
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
        value = from_logits(metric, run.logits, batch.targets).sum() / n_total
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
