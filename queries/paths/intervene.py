"""Attention interventions: `actstore intervene` (Merullo et al.'s repair of Colored Objects).

At each prompt's position of the role `at` (END by default), every chosen head's attention
becomes (1 − W)·its own pattern + W·one-hot on the role `attend`; everything downstream is
recomputed. The pattern weighs the head's values, so the edit is linear in them: the head's z at
`at` becomes (1 − W)·z + W·v(attend), v the head's value (its key/value head's, under grouped-
query attention) at the attended position. The run intervened on is the clean one (the task's
own prompts); the recompute starts from its stored residual at the first chosen layer.

Rows of `interventions(query_id, prompt_idx, metric, value_before, value_after,
accuracy_before, accuracy_after)`: one per prompt (accuracy 1 or 0: whether the correct answer
set outscores the incorrect one) and one for the run (prompt_idx NULL: means over prompts, so
accuracy is the share of prompts right).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from actstore.core.choices import METRICS, check
from actstore.core.errors import UsageError
from actstore.core.output import progress_bar
from actstore.core.runtime import Runtime
from actstore.core.store import Store
from queries.core.recorded import recorded
from queries.core.sweep import RunContext, check_cluster, cluster, in_order, run_context
from queries.paths.spec import parse_heads, run_shape

KIND = "intervene"
COLUMNS = ["query_id", "prompt_idx", "metric", "value_before", "value_after", "accuracy_before",
           "accuracy_after"]  # fmt: skip


def check_intervention(
    store: Store, run: int, heads: str, attend: str, at: str, weight: float, metric: str
) -> dict[str, Any]:
    """The query's recorded parameters, checked against the run (no torch)."""
    from actstore.core.roles import positions

    check("--metric", metric, METRICS)
    if not 0.0 <= weight <= 1.0:
        raise UsageError(f"--weight {weight}: give a weight between 0 and 1")
    chosen = parse_heads(heads, run_shape(store, run))
    attend, at = attend.strip(), at.strip()
    where = positions(store, run, [attend, at])  # a role the run lacks is refused here
    late = np.flatnonzero(where[:, 0] > where[:, 1])
    if len(late):
        raise UsageError(
            f"--attend {attend} comes after --at {at} in prompt {int(late[0])}: a position "
            "attends only to itself and earlier ones; choose an earlier role"
        )
    return {"heads": [h.name for h in chosen], "attend": attend, "at": at, "weight": weight,
            "metric": metric}  # fmt: skip


def stored_interventions(store: Store, query_id: int) -> pl.DataFrame:
    return store._trusted_query(
        f"SELECT {', '.join(COLUMNS)} FROM interventions WHERE query_id = ? "
        "ORDER BY prompt_idx NULLS FIRST",
        [query_id],
    )


def intervene(
    store: Store,
    run: int,
    heads: str,
    attend: str,
    at: str = "END",
    weight: float = 1.0,
    metric: str = "logit-diff",
    recompute: bool = False,
    runtime: Runtime = Runtime(),
) -> pl.DataFrame:
    """Metric and accuracy before and after an attention intervention, for the run (first row)
    and each prompt; recorded as an `intervene` query. With the runtime's workers or scheduler
    the prompt batches are Dask tasks (queries/core/sweep.py)."""
    params = check_intervention(store, run, heads, attend, at, weight, metric)
    check_cluster(runtime)

    def compute() -> dict[str, pl.DataFrame]:
        return {"interventions": compute_intervention(store, run, params, runtime)}

    return recorded(store, KIND, run, params, compute, lambda q: stored_interventions(store, q),
                    recompute)  # fmt: skip


def compute_intervention(
    store: Store, run: int, params: dict[str, Any], runtime: Runtime = Runtime()
) -> pl.DataFrame:
    """interventions rows (without query_id) of checked parameters, over the run's batches (as
    Dask tasks with the runtime's workers or scheduler, rows kept in batch order)."""
    from queries.core.run_model import model_for_run

    context = RunContext.of(store, run, model_for_run(store.run(run), runtime.device))
    local = _Setup(context, params).span_rows
    spans = list(context.reader.spans())
    bar = progress_bar(runtime.progress, total=len(spans), desc=f"intervene run {run}",
                       unit="batch")  # fmt: skip
    rows = []
    with cluster(runtime) as client:
        for part in in_order(client, local, _span_task, spans, store.location, run, params,
                             runtime.device, done=lambda: bar.update(1)):  # fmt: skip
            rows += part
    bar.close()
    frame = pl.DataFrame(
        rows,
        schema={"prompt_idx": pl.Int32, "metric": pl.String, "value_before": pl.Float64,
                "value_after": pl.Float64, "accuracy_before": pl.Float64,
                "accuracy_after": pl.Float64},
        orient="row",
    )  # fmt: skip
    total = frame.select(pl.lit(None, dtype=pl.Int32).alias("prompt_idx"), pl.first("metric"),
                         pl.exclude("prompt_idx", "metric").mean())  # fmt: skip
    return pl.concat([total, frame])


class _Setup:
    """What every prompt batch of an intervention shares: the run's context, the heads and each
    prompt's positions of the two roles."""

    def __init__(self, context: RunContext, params: dict[str, Any]):
        self.engine, self.reader, self.params = context.engine, context.reader, params
        run = int(context.run["run_id"])
        self.heads = parse_heads(",".join(params["heads"]), run_shape(context.store, run))
        self.where = context.positions([params["attend"], params["at"]])

    def span_rows(self, span: Any) -> list[tuple]:
        """One prompt batch's rows (prompt_idx, metric, value and accuracy before, after)."""
        import torch

        from actstore.model.hooks import final_hook, hook_name
        from actstore.model.metrics import from_resid

        e, reader, params, heads = self.engine, self.reader, self.params, self.heads
        first = min(h.layer for h in heads)
        with torch.no_grad():
            t, last = reader.targets(span), reader.finals(span)
            idx = torch.arange(span.size, device=last.device)
            roles = torch.as_tensor(self.where[span.index], device=last.device)
            x = reader.tensor("clean", hook_name("resid_pre", first), span)
            for layer in range(first, e.n_layers):
                chosen = [h.head for h in heads if h.layer == layer]
                edit = _edit(e, layer, x, chosen, roles, params["weight"]) if chosen else None
                x = e.block(layer, x, edit_z=edit)
            after = x[idx, last]
            before = reader.tensor("clean", final_hook(e.n_layers), span)[idx, last]
            values = [from_resid(e, m, r, t).double().cpu().numpy()
                      for m in (params["metric"], "accuracy") for r in (before, after)]  # fmt: skip
        return [(int(p), params["metric"], *map(float, v))
                for p, *v in zip(span.index, *values, strict=True)]  # fmt: skip


def _span_task(
    span: Any, location: str, run: int, params: dict[str, Any], device: str | None
) -> list[tuple]:
    """One prompt batch's rows, on a Dask worker (the run's context made once there)."""
    return _Setup(run_context(location, run, device), params).span_rows(span)


def _edit(e, layer: int, x, chosen: list[int], roles, weight: float):
    """The edit of a layer's z (B, T, heads, d_head): at each prompt's `at` position the chosen
    heads' z moves to (1 − w)·z + w·v at the `attend` position; x is the layer's input."""
    import torch

    pos = torch.arange(x.shape[1], device=x.device)
    _, v = e.kv(layer, e.ln1(layer, x), pos)  # (B, T, kv_heads, d_head)
    rows = torch.arange(x.shape[0], device=x.device)
    heads = torch.as_tensor(chosen, device=x.device)
    attended = v[rows, roles[:, 0]][:, heads // e.arch.group_size]  # (B, chosen, d_head)

    def fn(z):
        z = z.clone()
        own = z[rows, roles[:, 1]][:, heads]
        z[rows[:, None], roles[:, 1, None], heads[None, :]] = (1 - weight) * own + weight * attended
        return z

    return fn
