"""Head classes on the run's own prompts: previous-token, duplicate-token and induction scores.

Each is TransformerLens' `head_detector.detect_head` with its default "mul" measure: per prompt,
the share of a head's attention (over every query position of the prompt's real tokens) that
falls where the class's detection pattern is 1 (the previous token; an earlier occurrence of
the same token; the token after an earlier occurrence), averaged over prompts. The patterns are
the engine's (queries/attention/attend.py), so a lean run's heads are scored like a full one's.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import numpy as np
import polars as pl

from actstore.core.choices import SIDES, check, check_batch_size
from actstore.core.runtime import Runtime
from actstore.core.store import Store
from queries.attention.attend import attention_patterns
from queries.core.recorded import recorded

if TYPE_CHECKING:
    import torch

    from actstore.model.adapter import ModelAdapter

KIND = "head-scores"
CLASSES = ("previous-token", "duplicate-token", "induction")
COLUMNS = ["query_id", "layer", "head", "class", "side", "value"]


def detection_patterns(tokens: torch.Tensor) -> dict[str, torch.Tensor]:
    """Each class's (T, T) detection pattern for one prompt's tokens, as TransformerLens 4.3
    builds them (previous token; same token earlier, the diagonal left out; and that shifted one
    key position on, the first key column zero)."""
    import torch

    n = tokens.shape[-1]
    previous = torch.zeros(n, n)
    previous[1:, :-1] = torch.eye(n - 1)
    same = (tokens[None, :] == tokens[:, None]).float()
    same.fill_diagonal_(0)
    duplicate = torch.tril(same)
    shifted = torch.roll(duplicate, shifts=1, dims=1)
    induction = torch.cat([torch.zeros(n, 1), shifted[:, 1:]], dim=1)
    return {
        "previous-token": torch.tril(previous),
        "duplicate-token": duplicate,
        "induction": torch.tril(induction),
    }


def head_scores(
    store: Store,
    run: int,
    side: str = "clean",
    batch_size: int = 8,
    model: ModelAdapter | None = None,
    recompute: bool = False,
    runtime: Runtime = Runtime(),
) -> pl.DataFrame:
    """Per layer and head, its previous-token, duplicate-token and induction scores on the
    run's prompts (`side`), recorded in `head_scores`; from the catalog when asked before."""
    check("--side", side, SIDES)
    check_batch_size(batch_size)
    runtime.in_process("heads")
    store.run(run)
    params = {"side": side}

    def compute() -> dict[str, pl.DataFrame]:
        from queries.core.run_model import model_for_run

        adapter = model_for_run(store.run(run), runtime.device, model)
        return {"head_scores": _compute(store, run, side, adapter, batch_size)}

    def read(query_id: int) -> pl.DataFrame:
        return store._trusted_query(
            f"SELECT {', '.join(COLUMNS)} FROM head_scores WHERE query_id = ? "
            "ORDER BY layer, head, list_position(?, class)",
            [query_id, list(CLASSES)],
        )

    return recorded(store, KIND, run, params, compute, read, recompute)


def _compute(
    store: Store, run: int, side: str, model: ModelAdapter, batch_size: int
) -> pl.DataFrame:
    import torch

    n_layers, n_heads = model.shape.n_layers, model.shape.n_heads
    sums = np.zeros((len(CLASSES), n_layers, n_heads))
    n = 0
    lengths = store.prompts(run, ["seq_len"])["seq_len"].to_numpy()
    for span, patterns in attention_patterns(store, run, side, model, batch_size):
        tokens = torch.as_tensor(store.read(run, side, "tokens", span.lo, span.hi)).long()
        for i, b in enumerate(span.index):
            t = int(lengths[b])
            found = detection_patterns(tokens[int(b) - span.lo, :t].cpu())
            for layer, pattern in enumerate(patterns):
                p = pattern[i, :, :t, :t].double().cpu()  # (H, t, t)
                for c, name in enumerate(CLASSES):
                    sums[c, layer] += ((p * found[name]).sum((-1, -2)) / p.sum((-1, -2))).numpy()
        n += span.size
    rows = [
        (layer, head, name, side, float(sums[c, layer, head] / n))
        for layer in range(n_layers)
        for head in range(n_heads)
        for c, name in enumerate(CLASSES)
    ]
    return pl.DataFrame(
        rows,
        schema={"layer": pl.Int32, "head": pl.Int32, "class": pl.String, "side": pl.String,
                "value": pl.Float64},
        orient="row",
    )  # fmt: skip
