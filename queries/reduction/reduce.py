"""Out-of-core reductions over prompts, computed by Dask straight from the Zarr chunks.

`mean` gives per-position mean activations (mean ablation), `class-mean` the same per value of
a prompts column (class means for subspace directions), `head-norm` the mean L2 norm of each
head's activation per position. Padding positions (at or beyond a prompt's `seq_len`) are left
out of every mean. Dask reads one chunk of prompts per task (through the store's verified
array, so each chunk is checked against the ledger) and sums in float64, so memory is bounded
by a few chunks whatever the number of prompts. The graph runs on this process's threads, or,
with a Runtime's `workers` or `scheduler` (actstore/core/runtime.py, the same meaning as on every
verb), on a local Dask cluster or on a running one whose workers see the store at the same
location.

A hook the run derives on read rather than stores (the default layout: actstore.model.derivable) is
reduced the same way, each chunk of prompts derived by the queries' one reader with the run's
model (queries.core.reader.DerivedArray): only then are torch and the model loaded, so a
reduction of a stored hook stays torch-free.

Results are recorded as a `reduce` query with rows in `reductions(query_id, hook, grp, pos, idx,
value, n)`: `idx` is the flat feature index (head for head-norm), `n` the number of prompts that
contributed.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import polars as pl

from actstore.core.choices import OPS, check
from actstore.core.errors import UsageError
from actstore.core.runtime import Runtime
from actstore.core.store import Store
from queries.core.recorded import recorded
from queries.core.sweep import check_cluster, cluster

KIND = "reduce"


def reduce(
    store: Store,
    run: int,
    hook: str,
    op: str = "mean",
    by: str | None = None,
    side: str = "clean",
    recompute: bool = False,
    runtime: Runtime = Runtime(),
) -> pl.DataFrame:
    """Reduce a stored hook over the run's prompts; cached by parameters like every query."""
    check("--op", op, OPS)
    if op == "class-mean":
        by = by or "grp"
    elif by is not None:
        raise UsageError(f"--by is for --op class-mean, not {op}")
    derived = store.derives(run, side, hook)
    shape = None if derived else tuple(store.array(run, side, hook).shape)
    if op == "head-norm" and (shape is None or len(shape) != 4):
        held = "derived, one vector per position" if derived else f"of shape {shape}"
        raise UsageError(
            f"--op head-norm needs a per-head hook (z, q, k, v, pattern); {hook} is {held}"
        )
    params = {"hook": hook, "op": op, "by": by, "side": side}
    check_cluster(runtime)

    def compute() -> dict[str, pl.DataFrame]:
        return {"reductions": _compute(store, run, hook, side, op, by, runtime)}

    return recorded(
        store, KIND, run, params, compute, lambda query_id: _rows(store, query_id), recompute
    )


def _rows(store: Store, query_id: int) -> pl.DataFrame:
    return store._trusted_query(
        "SELECT * FROM reductions WHERE query_id = ? ORDER BY grp, pos, idx", [query_id]
    )


def _source(store: Store, run_id: int, side: str, hook: str, device: str | None) -> Any:
    """What Dask reads: the stored array, every chunk checked against the ledger, or the
    derived values (reading the stored chunks they come from checked the same way)."""
    if not store.derives(run_id, side, hook):
        return store.array(run_id, side, hook)
    from queries.core.reader import DerivedArray

    return DerivedArray(store, run_id, side, hook, device)


def _groups(store: Store, run_id: int, by: str | None) -> tuple[np.ndarray, np.ndarray, list]:
    """Each prompt's real length and group code, and the group labels (in code order)."""
    if by is not None:
        store.check_prompt_columns([by], "--by")
    key = f'CAST("{by}" AS VARCHAR)' if by is not None else "'all'"
    df = store._trusted_query(
        f"SELECT seq_len, {key} AS grp FROM prompts WHERE run_id = ? ORDER BY prompt_idx",
        [run_id],
    )
    labels = sorted(set(df["grp"].to_list()), key=str)
    codes = df["grp"].replace_strict(labels, list(range(len(labels)))).to_numpy()
    return df["seq_len"].to_numpy(), codes, labels


def _compute(
    store: Store,
    run_id: int,
    hook: str,
    side: str,
    op: str,
    by: str | None,
    runtime: Runtime,
) -> pl.DataFrame:
    import dask
    import dask.array as da

    lengths, codes, labels = _groups(store, run_id, by)
    arr = _source(store, run_id, side, hook, runtime.device)
    x = da.from_array(arr, chunks=(arr.chunks[0], *arr.shape[1:]), asarray=False, lock=False)
    n, seq = x.shape[:2]
    prompt_chunks = (x.chunks[0],)
    if op == "head-norm":
        values = da.sqrt((x.astype("float64") ** 2).sum(axis=-1))
    else:
        values = x.reshape(n, seq, -1).astype("float64")
    lengths_da = da.from_array(lengths, chunks=prompt_chunks)
    codes_da = da.from_array(codes, chunks=prompt_chunks)
    mask = (da.arange(seq)[None, :] < lengths_da[:, None]).astype("float64")
    onehot = (codes_da[:, None] == da.arange(len(labels))[None, :]).astype("float64")
    sums = da.einsum("ng,np,npf->gpf", onehot, mask, values)
    counts = da.einsum("ng,np->gp", onehot, mask)
    with cluster(runtime) as client:
        sums_np, counts_np = dask.compute(sums, counts, scheduler=client or "threads")
    return _frame(hook, labels, sums_np, counts_np)


def _frame(hook: str, labels: list, sums: np.ndarray, counts: np.ndarray) -> pl.DataFrame:
    """Long rows (hook, grp, pos, idx, value, n) for every (group, position) with prompts."""
    g, p, f = sums.shape
    grp, pos, idx = np.meshgrid(np.arange(g), np.arange(p), np.arange(f), indexing="ij")
    n = np.broadcast_to(counts[:, :, None], sums.shape)
    keep = (n > 0).ravel()
    with np.errstate(invalid="ignore", divide="ignore"):
        mean = sums / n
    return pl.DataFrame(
        {
            "hook": hook,
            "grp": np.asarray(labels, dtype=object)[grp.ravel()[keep]].tolist(),
            "pos": pos.ravel()[keep].astype(np.int32),
            "idx": idx.ravel()[keep].astype(np.int32),
            "value": mean.ravel()[keep],
            "n": n.ravel()[keep].astype(np.int32),
        }
    )
