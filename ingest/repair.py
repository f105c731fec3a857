"""`actstore verify --repair`: recompute just the damaged or missing chunks of a store.

A chunk is one ingest batch of one array, so a repair reruns that batch with the run's recorded
parameters (model, task or dataset, seed, corruption, dtype) and rewrites only the damaged
arrays' chunks. A recomputed chunk is written only when its checksum equals the ledger's: the
repair restores the original bits or leaves the chunk alone, never a near-copy.

Before any chunk is rewritten: the temporary files of killed writers are removed, lost array
metadata is written again from the `arrays` table (chunks still on disk become readable again),
and the recorded queries of every run with damage are deleted with their result rows, in one
transaction, so that no result computed before the repair is served after it.
"""

from __future__ import annotations

import json
from typing import Any

import polars as pl

from actstore.core import arrays as zarrays
from actstore.core.arrays import open_array
from actstore.core.errors import ActstoreError
from actstore.core.runtime import Runtime
from actstore.core.store import Store, check_store
from actstore.core.verify import PIECE, REPAIRABLE, verify
from actstore.model.adapter import load_model

COLUMNS = {**PIECE, "result": pl.String, "detail": pl.String}


def repair(store: Store, run: int | None = None, runtime: Runtime = Runtime()) -> pl.DataFrame:
    """Rewrite every damaged or missing chunk that can be recomputed (on the runtime's device);
    one row per chunk, plus rows for what was cleaned up, restored or invalidated on the way.
    The store's writer lock is shared (a caller inside `with store.writer():`)."""
    check_store(store, "repair", create=False)
    store.check_exists()  # a store not made yet has nothing to repair, and is not made here
    device = runtime.in_process("repair").device
    rows: list[dict[str, Any]] = []
    with store.writer():
        rows.extend(_restore_metadata(store, run))
        findings = verify(store, run).filter(pl.col("problem").is_in(REPAIRABLE))
        damaged_runs = findings["run_id"].drop_nulls().unique().sort().to_list()
        with store.transaction() as tx:
            forgotten = {rid: tx.forget_queries([rid]) for rid in damaged_runs}
        for rid in damaged_runs:
            if forgotten[rid]:
                detail = f"deleted its {forgotten[rid]} recorded queries and their results"
                rows.append(_note(rid, "invalidated", detail + "; ask them again"))
            rows.extend(_repair_run(store, int(rid), findings.filter(pl.col("run_id") == rid),
                                    device))  # fmt: skip
    return pl.DataFrame(rows, schema=COLUMNS)


def _note(run_id: int | None, result: str, detail: str) -> dict[str, Any]:
    return {**{k: None for k in PIECE}, "run_id": run_id, "result": result, "detail": detail}


def _restore_metadata(store: Store, run_id: int | None) -> list[dict[str, Any]]:
    """Remove killed writers' temporary files; write lost group and array metadata again."""
    out = []
    root = store.arrays_root
    arrays_dir = root.local if root.is_local else None  # an object store has no partial files
    removed = sum(
        zarrays.remove_partial_files(root, d.name)
        for d in (arrays_dir.iterdir() if arrays_dir and arrays_dir.is_dir() else [])
        if d.is_dir() and d.name.startswith("run")  # staged/ belongs to shards, maybe running
    )
    if removed:
        out.append(_note(None, "removed", f"{removed} temporary *.partial files of killed "
                         "writers"))  # fmt: skip
    problem = zarrays.root_problem(root)
    if problem is not None:
        zarrays.write_metadata(root, "", zarrays.root_document())
        out.append(_note(None, "restored", f"{root.show('zarr.json')} (the arrays' root group, "
                         f"which {problem})"))  # fmt: skip
    group = None
    for row in store.arrays(run_id).iter_rows(named=True):
        name = zarrays.array_name(row["run_id"], row["side"], row["hook"])
        expected = zarrays.expected_metadata(row)
        try:
            arr = open_array(root, name)
            if expected is None or zarrays.metadata_difference(arr, expected) is None:
                continue
        except Exception:  # gone or unreadable metadata: written again below
            pass
        if expected is not None:
            zarrays.write_metadata(root, name, expected)
        else:  # a row of another codec recorded before documents were: only a lost file
            group = group or zarrays.open_root(root, mode="a")
            zarrays.create_metadata(group, name, tuple(json.loads(row["shape"])),
                                    json.loads(row["chunks"])[0], row["dtype"])  # fmt: skip
        out.append({**{k: row.get(k) for k in PIECE}, "result": "restored",
                    "detail": f"array metadata {root.show(name)}/zarr.json written again from "
                    "the arrays table"})  # fmt: skip
    return out


def _repair_run(
    store: Store, run_id: int, damaged: pl.DataFrame, device: str | None
) -> list[dict[str, Any]]:
    from ingest.batches import compute_batch, write_chunks  # torch: only when repairing
    from ingest.prompts import load_pairs, prepare

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
    _, pairs, source = load_pairs(
        model, params["task"], params.get("dataset"), params["n"], params["seed"]
    )
    if source.get("dataset_sha256") != params.get("dataset_sha256"):
        raise ActstoreError(
            f"cannot repair run {run_id}: dataset {params['dataset']} changed since ingest"
        )
    prep = prepare(model, pairs, params["corruption"])
    if prep.clean.shape[1] != params["seq_len"]:
        raise ActstoreError(f"cannot repair run {run_id}: its prompts no longer tokenize the same")
    out, rewritten = [], set()
    for (chunk_idx, lo, hi), group in damaged.group_by(
        ["chunk_idx", "prompt_start", "prompt_stop"], maintain_order=True
    ):
        values, _ = compute_batch(model, prep, params, int(lo), int(hi))
        recorded = {
            (r["side"], r["hook"]): r["checksum"]
            for r in store._trusted_query(
                "SELECT side, hook, checksum FROM chunks WHERE run_id = ? AND chunk_idx = ?",
                [run_id, int(chunk_idx)],
            ).iter_rows(named=True)
        }
        arrays = {}
        for row in group.iter_rows(named=True):
            key = (row["side"], row["hook"])
            where = {k: row[k] for k in COLUMNS if k in row}
            try:
                arr = open_array(store.arrays_root, zarrays.array_name(run_id, *key), mode="r+")
            except Exception:  # gone, and no arrays row to restore it from: a partial run
                out.append({**where, "result": "not repaired", "detail": "the whole array is "
                            "gone; rerun the run's ingest command (or --restart)"})  # fmt: skip
                continue
            arr = arr.with_config(zarrays.WRITE_CONFIG)
            zarrays.clear_chunk_key(store.arrays_root, arr.path, int(chunk_idx), arr.ndim)
            ok = zarrays.checksum(values[key].astype(arr.dtype, copy=False)) == recorded[key]
            if ok:
                arrays[key] = arr
            out.append({**where, "result": "repaired" if ok else "not repaired",
                        "detail": "recomputed bit for bit" if ok else
                        "recomputed values differ from the ledger checksum (other hardware or "
                        "library versions?); chunk left as it was"})  # fmt: skip
        write_chunks(store.arrays_root, arrays, values, int(chunk_idx), int(lo), int(hi))
        rewritten.update(arrays)
    sizes = {key: zarrays.stored_bytes(store.arrays_root, zarrays.array_name(run_id, *key))
             for key in rewritten}  # fmt: skip
    if sizes:
        with store.transaction() as tx:  # what `info` reports stored is what is there again
            tx.set_stored_bytes(run_id, sizes)
    return out
