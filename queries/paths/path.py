"""Path patching from the store: `actstore path` and `ActStore.path`.

Rows of `path_effects(query_id, sender, receiver, qkv, role, metric, value, normalized)`: one per
sender, receiver (queries/paths/spec.py) and role. `value` is the metric of the patched base run,
mean over prompts (what TransformerLens' `get_act_patch_direct_path` returns per receiver);
`normalized` is (value − m_corrupted) / (m_clean − m_corrupted), 1 clean-like, as for `patch`.
Directions as `patch`: denoise patches the clean sender output into the corrupted run, noise the
corrupted one into the clean run. `positions` (token roles, e.g. END) restrict the sender's
change to that role's position in each prompt, one row per role; without it the change is at
every position and `role` is NULL. The computation is queries/paths/compute.py.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from actstore.core.choices import DIRECTIONS, METRICS, check
from actstore.core.errors import UsageError
from actstore.core.output import progress_bar
from actstore.core.store import Store
from actstore.model.metrics import normalized
from queries.core.recorded import recorded
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
    device: str | None = None,
    progress: bool | None = None,
    recompute: bool = False,
) -> pl.DataFrame:
    """Path patching of a run's senders into its receivers, recorded as a `path` query; rows
    ranked by importance within each receiver and role."""
    params = check_path(store, run, senders, receivers, positions, metric, direction)

    def compute() -> dict[str, pl.DataFrame]:
        return {"path_effects": compute_paths(store, run, params, device, progress)}

    return recorded(store, KIND, run, params, compute, lambda q: stored_paths(store, q), recompute)


def compute_paths(
    store: Store,
    run: int,
    params: dict[str, Any],
    device: str | None = None,
    progress: bool | None = None,
    reuse_prefix: bool = True,
) -> pl.DataFrame:
    """path_effects rows (without query_id) of checked parameters, over the run's batches;
    `reuse_prefix=False` recomputes role-restricted variants at every position (the reference
    the prefix reuse is tested and benchmarked against)."""
    import torch

    from actstore.model.metrics import endpoints
    from queries.core.engine import Engine
    from queries.core.reader import Reader
    from queries.core.run_model import model_for_run
    from queries.paths.compute import span_sums

    info = store.run(run)
    model = model_for_run(info, device)
    e = Engine.from_adapter(model)
    a = e.arch
    shape = Shape(a.n_layers, a.n_heads, a.parallel)
    chosen = recorded_pairs(params, shape)
    roles = params["positions"]
    at = None
    if roles is not None:
        from actstore.core.roles import positions

        at = positions(store, run, roles)
    reader = Reader(store, info, model.device, e)
    spans = list(reader.spans())
    metric = params["metric"]
    sums = np.zeros((len(chosen), 1 if roles is None else len(roles)))
    clean = corrupted = 0.0
    for span in progress_bar(progress, iterable=spans, desc=f"path run {run}", unit="batch"):
        sums += span_sums(e, reader, span, chosen, at, metric, params["direction"], reuse_prefix)
        with torch.no_grad():
            t = reader.targets(span)
            c, k = endpoints(metric, t, reader.tensor("corrupted", "logits", span))
        clean, corrupted = clean + c, corrupted + k
    n = reader.n
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
