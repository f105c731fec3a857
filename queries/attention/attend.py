"""`actstore attention`: per head, the mean attention probability from one role to others.

Each prompt's pattern is recomputed from its stored (or derived) residual stream entering each
layer through the query core's engine, with the model's own norms, rotary positions, grouped
key/value heads, soft caps and sliding windows (what every patching query computes with), and
read at that prompt's positions of the roles (actstore.core.roles): the heads that attend from
END to IO are found however long each prompt is. Rows land in the `attention` table, recorded
like every query (asked again, read from the catalog without torch).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from actstore.core.choices import SIDES, check, check_batch_size
from actstore.core.errors import UsageError
from actstore.core.roles import END, role_names
from actstore.core.roles import positions as role_positions
from actstore.core.runtime import Runtime
from actstore.core.store import Store
from queries.core.recorded import recorded

if TYPE_CHECKING:
    import torch

    from actstore.model.adapter import ModelAdapter

KIND = "attention"
COLUMNS = ["query_id", "layer", "head", "from_role", "to_role", "side", "value"]


def _roles(given: str | Sequence[str] | None, option: str) -> list[str]:
    if given is None:
        return []
    items = given.split(",") if isinstance(given, str) else list(given)
    items = [i.strip() for i in items]
    if not all(items):
        raise UsageError(f"{option} {given!r}: an empty entry; give roles like IO,S1,S2")
    return list(dict.fromkeys(items))


def check_params(
    store: Store, run: int, source: str, targets: str | Sequence[str] | None, side: str
) -> dict:
    """The query's parameters, validated against the run's roles before anything loads."""
    check("--side", side, SIDES)
    names = role_names(store, run)
    sources = _roles(source, "--from")
    if len(sources) != 1:
        raise UsageError(f"--from {source}: give one role (roles: {', '.join(names)})")
    to = _roles(targets, "--to") or names
    for option, asked in (("--from", sources), ("--to", to)):
        unknown = [r for r in asked if r not in names]
        if unknown:
            raise UsageError(
                f"{option} {','.join(asked)}: run {run} has no role {unknown[0]!r}; its roles: "
                f"{', '.join(names)}"
            )
    role_positions(store, run, [*sources, *to])  # on every prompt, or a one-line error
    return {"from": sources[0], "to": to, "side": side}


def stored_attention(store: Store, query_id: int, to: Sequence[str]) -> pl.DataFrame:
    rows = store._trusted_query(
        f"SELECT {', '.join(COLUMNS)} FROM attention WHERE query_id = ? ORDER BY layer, head",
        [query_id],
    )
    order = pl.col("to_role").replace_strict(list(to), list(range(len(to))), default=None)
    return rows.sort(pl.col("layer"), pl.col("head"), order, maintain_order=True)


def attention(
    store: Store,
    run: int,
    source: str = END,
    to: str | Sequence[str] | None = None,
    side: str = "clean",
    batch_size: int = 8,
    model: ModelAdapter | None = None,
    recompute: bool = False,
    runtime: Runtime = Runtime(),
) -> pl.DataFrame:
    """Per layer and head, the attention probability from role `source` to each role of `to`
    (default: every role) on `side`, averaged over prompts; from the catalog when asked before.
    Columns: query_id, layer, head, from_role, to_role, side, value."""
    check_batch_size(batch_size)
    runtime.in_process("attention")
    store.run(run)
    params = check_params(store, run, source, to, side)

    def compute() -> dict[str, pl.DataFrame]:
        from queries.core.run_model import model_for_run

        adapter = model_for_run(store.run(run), runtime.device, model)
        return {"attention": _compute(store, run, params, adapter, batch_size)}

    return recorded(store, KIND, run, params, compute,
                    lambda query_id: stored_attention(store, query_id, params["to"]),
                    recompute)  # fmt: skip


def attention_patterns(store: Store, run: int, side: str, model: ModelAdapter, batch_size: int = 8):
    """Every prompt's attention pattern (B, heads, seq, seq) per layer, span by span: yields
    (span, [pattern of layer 0, 1, …]) recomputed from the stored residual stream."""
    import torch

    from actstore.model.hooks import hook_name
    from queries.core.engine import Engine
    from queries.core.reader import Reader

    e = Engine.from_adapter(model)
    reader = Reader(store, run, model.device, e)
    names = [hook_name("resid_pre", layer) for layer in range(e.n_layers)]
    reader.require(names, "attention")
    with torch.inference_mode():
        for span in reader.spans(batch_size):
            yield (
                span,
                [
                    e.attention_pattern(layer, reader.tensor(side, name, span))
                    for layer, name in enumerate(names)
                ],
            )


def _compute(
    store: Store, run: int, params: dict, model: ModelAdapter, batch_size: int
) -> pl.DataFrame:
    """The `attention` rows: the probability from `from` to each `to` role, mean over prompts."""
    roles = [params["from"], *params["to"]]
    at = role_positions(store, run, roles)
    n_layers, n_heads = model.shape.n_layers, model.shape.n_heads
    sums = np.zeros((n_layers, n_heads, len(params["to"])))
    n = 0
    for span, patterns in attention_patterns(store, run, params["side"], model, batch_size):
        where = at[span.index]
        for layer, pattern in enumerate(patterns):
            sums[layer] += _picked(pattern, where).sum(0)
        n += span.size
    rows = [
        (layer, head, params["from"], to, params["side"], float(sums[layer, head, j] / n))
        for layer in range(n_layers)
        for head in range(n_heads)
        for j, to in enumerate(params["to"])
    ]
    return pl.DataFrame(
        rows,
        schema={"layer": pl.Int32, "head": pl.Int32, "from_role": pl.String,
                "to_role": pl.String, "side": pl.String, "value": pl.Float64},
        orient="row",
    )  # fmt: skip


def _picked(pattern: torch.Tensor, where: np.ndarray) -> np.ndarray:
    """pattern (B, H, T, T) at each prompt's (from, to_j) positions → (B, H, n_to)."""
    import torch

    rows = torch.arange(pattern.shape[0], device=pattern.device)[:, None]
    src = torch.as_tensor(where[:, :1], device=pattern.device)
    dst = torch.as_tensor(where[:, 1:], device=pattern.device)
    picked = pattern.permute(0, 2, 3, 1)[rows, src, dst]  # (B, n_to, H)
    return picked.permute(0, 2, 1).double().cpu().numpy()
