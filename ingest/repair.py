"""`actstore verify --repair`: recompute just the damaged or missing chunks of a store.

A chunk is one ingest batch of one array, so a repair reruns that batch with the run's recorded
parameters (model, task or dataset, seed, corruption, dtype) and rewrites only the damaged
arrays' chunks. A recomputed chunk is written only when its checksum equals the ledger's: the
repair restores the original bits or leaves the chunk alone, never a near-copy.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import polars as pl

from actstore import arrays as zarrays
from actstore.errors import ActstoreError
from actstore.models import load_model
from actstore.store import Store
from actstore.verify import PIECE, REPAIRABLE, verify

COLUMNS = {**PIECE, "result": pl.String, "detail": pl.String}


def repair(store_path: str | Path, run_id: int | None = None, device: str | None = None):
    """Rewrite every damaged or missing chunk that can be recomputed; one row per chunk."""
    store = Store(store_path)
    rows: list[dict[str, Any]] = []
    with store.writer():
        findings = verify(store, run_id).filter(pl.col("problem").is_in(REPAIRABLE))
        for rid in findings["run_id"].unique().sort().to_list():
            rows.extend(_repair_run(store, int(rid), findings.filter(pl.col("run_id") == rid),
                                    device))  # fmt: skip
    return pl.DataFrame(rows, schema=COLUMNS)


def _repair_run(
    store: Store, run_id: int, damaged: pl.DataFrame, device: str | None
) -> list[dict[str, Any]]:
    from ingest.runner import _compute_batch, _load_pairs, _prepare, write_chunks

    params = store.run(run_id, complete=False)["params"]
    try:
        model = load_model(params["model"], device)
    except ActstoreError as exc:
        raise ActstoreError(f"cannot repair run {run_id}: {exc}") from None
    if model.fingerprint != params["fingerprint"]:
        raise ActstoreError(
            f"cannot repair run {run_id}: model {params['model']!r} now has different weights "
            f"than when it was ingested; re-ingest the run instead"
        )
    _, pairs, source = _load_pairs(
        model, params["task"], params.get("dataset"), params["n"], params["seed"]
    )
    if source.get("dataset_sha256") != params.get("dataset_sha256"):
        raise ActstoreError(
            f"cannot repair run {run_id}: dataset {params['dataset']} changed since ingest"
        )
    prep = _prepare(model, pairs, params["corruption"])
    if prep.clean.shape[1] != params["seq_len"]:
        raise ActstoreError(f"cannot repair run {run_id}: its prompts no longer tokenize the same")
    root = zarrays.open_root(store.path, mode="a")
    out = []
    for (chunk_idx, lo, hi), group in damaged.group_by(
        ["chunk_idx", "prompt_start", "prompt_stop"], maintain_order=True
    ):
        values, _ = _compute_batch(model, prep, params, int(lo), int(hi))
        recorded = {
            (r["side"], r["hook"]): r["checksum"]
            for r in store.query(
                "SELECT side, hook, checksum FROM chunks WHERE run_id = ? AND chunk_idx = ?",
                [run_id, int(chunk_idx)],
            ).iter_rows(named=True)
        }
        arrays = {}
        for row in group.iter_rows(named=True):
            key = (row["side"], row["hook"])
            where = {k: row[k] for k in COLUMNS if k in row}
            try:
                arr = root[zarrays.array_name(run_id, *key)].with_config(zarrays.WRITE_CONFIG)
            except (KeyError, ValueError, OSError):
                out.append({**where, "result": "not repaired", "detail": "the whole array is "
                            "gone; re-ingest the run (actstore ingest ... --restart)"})  # fmt: skip
                continue
            ok = zarrays.checksum(values[key].astype(arr.dtype, copy=False)) == recorded[key]
            if ok:
                arrays[key] = arr
            out.append({**where, "result": "repaired" if ok else "not repaired",
                        "detail": "recomputed bit for bit" if ok else
                        "recomputed values differ from the ledger checksum (other hardware or "
                        "library versions?); chunk left as it was"})  # fmt: skip
        write_chunks(store, run_id, arrays, values, int(chunk_idx), int(lo), int(hi))
    return out
