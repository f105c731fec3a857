"""Path patching from the store: `actstore path` and `ActStore.path`.

Rows of `path_effects(query_id, sender, receiver, qkv, role, metric, value, normalized)`: one per
sender, receiver (queries/paths/spec.py) and role. `value` is the metric of the patched base run,
mean over prompts (what TransformerLens' `get_act_patch_direct_path` returns per receiver);
`normalized` is (value − m_corrupted) / (m_clean − m_corrupted), 1 clean-like, as for `patch`.
Directions as `patch`: denoise patches the clean sender output into the corrupted run, noise the
corrupted one into the clean run. `positions` (token roles, e.g. END) restrict the sender's
change to that role's position in each prompt, one row per role; without it the change is at
every position and `role` is NULL. The computation is queries/paths/compute.py, per prompt batch,
in this process or as Dask tasks (a Runtime's `workers` or `scheduler`, queries/core/sweep.py).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from actstore.core.choices import DIRECTIONS, METRICS, check
from actstore.core.errors import UsageError
from actstore.core.output import progress_bar
from actstore.core.runtime import Runtime
from actstore.core.store import Store
from actstore.model.metrics import normalized
from queries.core.recorded import recorded
from queries.core.sweep import RunContext, check_cluster, cluster, in_order, run_context
from queries.paths.spec import (
    Shape,
    pairs,
    parse_receivers,
    parse_senders,
    recorded_pairs,
    run_shape,
)

KIND = "path"
COLUMNS = ["query_id", "sender", "receiver", "qkv", "role", "metric", "value", "normalized"]


def check_path(
    store: Store,
    run: int,
    senders: str,
    receivers: str,
    positions: list[str] | None,
    metric: str,
    direction: str,
) -> dict[str, Any]:
    """The query's recorded parameters, every spec checked against the run's model (no torch):
    a one-line UsageError otherwise."""
    check("--metric", metric, METRICS)
    check("--direction", direction, DIRECTIONS)
    shape = run_shape(store, run)
    sent, explicit = parse_senders(senders, shape)
    chosen = pairs(sent, explicit, parse_receivers(receivers, shape), shape.parallel)
    if positions is not None:
        positions = _check_roles(store, run, positions)
    return {
        "senders": sorted({s.name for s, _ in chosen}, key=[s.name for s in sent].index),
        "receivers": list(dict.fromkeys(r.label for _, r in chosen)),
        "positions": positions,
        "metric": metric,
        "direction": direction,
    }


def _check_roles(store: Store, run: int, roles: list[str]) -> list[str]:
    from actstore.core.roles import positions

    roles = list(dict.fromkeys(r.strip() for r in roles if r.strip()))
    if not roles:
        raise UsageError("--positions is empty: name roles such as END")
    positions(store, run, roles)  # a role the run lacks is refused here
    return roles


def stored_paths(store: Store, query_id: int) -> pl.DataFrame:
    return store._trusted_query(
        f"SELECT {', '.join(COLUMNS)}, importance, rank FROM path_effects_v WHERE query_id = ? "
        "ORDER BY receiver, qkv NULLS FIRST, role NULLS FIRST, rank",
        [query_id],
    )


def path(
    store: Store,
    run: int,
    senders: str,
    receivers: str,
    positions: list[str] | None = None,
    metric: str = "logit-diff",
    direction: str = "denoise",
    recompute: bool = False,
    runtime: Runtime = Runtime(),
) -> pl.DataFrame:
    """Path patching of a run's senders into its receivers, recorded as a `path` query; rows
    ranked by importance within each receiver and role."""
    params = check_path(store, run, senders, receivers, positions, metric, direction)
    check_cluster(runtime)

    def compute() -> dict[str, pl.DataFrame]:
        return {"path_effects": compute_paths(store, run, params, runtime)}

    return recorded(store, KIND, run, params, compute, lambda q: stored_paths(store, q), recompute)


def compute_paths(
    store: Store,
    run: int,
    params: dict[str, Any],
    runtime: Runtime = Runtime(),
    fast: bool = True,
) -> pl.DataFrame:
    """path_effects rows (without query_id) of checked parameters, over the run's batches (as
    Dask tasks with the runtime's workers or scheduler, partial sums added in batch order);
    `fast=False` recomputes every variant at every position of every layer from its first
    receiver's (the reference the shortcuts are tested and benchmarked against)."""
    from queries.core.run_model import model_for_run

    setup = _Setup(RunContext.of(store, run, model_for_run(store.run(run), runtime.device)),
                   params, fast)  # fmt: skip
    chosen, roles, metric = setup.chosen, params["positions"], params["metric"]
    spans = list(setup.reader.spans())
    sums = np.zeros((len(chosen), 1 if roles is None else len(roles)))
    clean = corrupted = 0.0
    bar = progress_bar(runtime.progress, total=len(spans), desc=f"path run {run}", unit="batch")
    with cluster(runtime) as client:
        parts = in_order(client, setup.span_sums, _span_task, spans, store.location, run, params,
                         fast, runtime.device, done=lambda: bar.update(1))  # fmt: skip
        for part, c, k in parts:  # in batch order: a fixed order of sums
            sums += part
            clean, corrupted = clean + c, corrupted + k
    bar.close()
    n = setup.reader.n
    rows = []
    for (s, r), values in zip(chosen, sums, strict=True):
        for ri, total in enumerate(values):
            value = float(total / n)
            rows.append((s.name, r.name, r.qkv, None if roles is None else roles[ri], metric,
                         value, normalized(value, clean / n, corrupted / n)))  # fmt: skip
    return pl.DataFrame(
        rows,
        schema={"sender": pl.String, "receiver": pl.String, "qkv": pl.String, "role": pl.String,
                "metric": pl.String, "value": pl.Float64, "normalized": pl.Float64},
        orient="row",
    )  # fmt: skip


class _Setup:
    """What every prompt batch of a path query shares: the run's context, the (sender,
    receiver) pairs and each prompt's positions of the roles."""

    def __init__(self, context: RunContext, params: dict[str, Any], fast: bool = True):
        self.engine, self.reader, self.params = context.engine, context.reader, params
        self.fast = fast
        a = self.engine.arch
        self.chosen = recorded_pairs(params, Shape(a.n_layers, a.n_heads, a.parallel))
        roles = params["positions"]
        self.at = None if roles is None else context.positions(roles)

    def span_sums(self, span: Any) -> tuple[np.ndarray, float, float]:
        """Per pair and role, the metric summed over the span's prompts; and the clean and
        corrupted endpoints summed over the span."""
        import torch

        from actstore.model.metrics import endpoints
        from queries.paths.compute import span_sums

        p, reader = self.params, self.reader
        sums = span_sums(self.engine, reader, span, self.chosen, self.at, p["metric"],
                         p["direction"], self.fast)  # fmt: skip
        with torch.no_grad():
            t = reader.targets(span)
            clean, corrupted = endpoints(p["metric"], t, reader.tensor("corrupted", "logits", span))
        return sums, clean, corrupted


def _span_task(
    span: Any, location: str, run: int, params: dict[str, Any], fast: bool,
    device: str | None,
) -> tuple[np.ndarray, float, float]:  # fmt: skip
    """One prompt batch's partial sums, on a Dask worker (the run's context made once there)."""
    return _Setup(run_context(location, run, device), params, fast).span_sums(span)
