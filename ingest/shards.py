"""Sharded ingest: N processes (on one machine or several sharing the store) each write a
disjoint, chunk-aligned prompt range, and `merge` folds their manifests into the catalog.

A shard never opens the catalog for writing. It writes its chunks into staged arrays
`arrays.zarr/staged/<params_hash>/<side>/<hook>` (one writer per Zarr chunk, since shards own
whole chunks) and, once every chunk is durable, a manifest
`manifests/run-<params_hash>/shard-<i>-of-<N>.json` holding its prompt rows, its chunk ledger
rows with checksums, and the run's parameters. `merge` is the single catalog writer: under the
writer lock it creates (or resumes) the run, and only when every shard's manifest is there does
it move the staged arrays to `run<id>/` and record prompts, ledger and arrays, marking the run
complete. Every step is idempotent, so an interrupted merge is finished by running it again.
"""

from __future__ import annotations

import fcntl
import json
import os
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

import polars as pl

from actstore.core import arrays as zarrays
from actstore.core.errors import ActstoreError, UsageError
from actstore.core.location import ArraysRoot
from actstore.core.output import progress_bar
from actstore.core.store import MANIFESTS, Store, check_store
from actstore.core.writes import array_records
from actstore.model.adapter import model_record

if TYPE_CHECKING:
    from actstore.model.adapter import ModelAdapter
    from ingest.prompts import Prepared

MERGED = "merged"
STAGED = "staged"
MANIFEST_FORMAT = 1


@dataclass(frozen=True)
class Shard:
    """Shard `index` (0-based) of `count`: a contiguous range of whole chunks."""

    index: int
    count: int

    def chunk_range(self, n_chunks: int) -> tuple[int, int]:
        return self.index * n_chunks // self.count, (self.index + 1) * n_chunks // self.count

    @property
    def label(self) -> str:
        return f"shard-{self.index}-of-{self.count}"


def parse_shard(text: str) -> Shard:
    """`"i/N"` -> Shard(i, N), with 0 <= i < N."""
    try:
        index, count = (int(part) for part in text.split("/"))
    except ValueError:
        raise UsageError(
            f"--shard {text}: write it as i/N, e.g. 0/4 (shards count from 0)"
        ) from None
    if count < 1 or not 0 <= index < count:
        raise UsageError(f"--shard {text}: need N >= 1 and 0 <= i < N (shards count from 0)")
    return Shard(index, count)


def manifest_dir(store_dir: Path, phash: str) -> Path:
    return store_dir / MANIFESTS / f"run-{phash}"


def staged_name(phash: str) -> str:
    return f"{STAGED}/{phash}"


@contextmanager
def _creation_lock(directory: Path) -> Iterator[None]:
    """Serialise array creation between the shards of one run on a shared filesystem."""
    fd = os.open(directory / ".create.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX)
        yield
    finally:
        fcntl.flock(fd, fcntl.LOCK_UN)
        os.close(fd)


def ingest_shard(
    store: Store,
    shard: Shard,
    model: ModelAdapter,
    prep: Prepared,
    params: dict,
    progress: bool | None,
) -> pl.DataFrame:
    """Write shard `shard`'s chunks into the staged arrays, then its manifest; no catalog write."""
    # torch, needed only here: parse_shard and merge stay light
    from ingest.batches import (
        array_shapes,
        compute_batch,
        create_arrays,
        params_hash,
        write_chunks,
    )
    from ingest.prompts import prompt_records

    started = time.monotonic()
    phash = params_hash(params)
    n, seq = prep.clean.shape
    batch = params["batch_size"]
    n_chunks = zarrays.batch_count(n, batch)
    first, stop = shard.chunk_range(n_chunks)
    mdir = manifest_dir(store.path, phash)
    mdir.mkdir(parents=True, exist_ok=True)
    root = store.arrays_root
    shapes = array_shapes(model, params, n, seq)
    with _creation_lock(mdir):
        group = zarrays.open_root(root, mode="a")
        arrays = create_arrays(group, staged_name(phash), shapes, batch, replace=False)
    prompts: list[dict[str, Any]] = []
    ledger: list[dict[str, Any]] = []
    for b in progress_bar(progress, iterable=range(first, stop), unit="batch",
                          desc=f"ingest {shard.label}"):  # fmt: skip
        lo, hi = zarrays.batch_bounds(b, batch, n)
        values, metrics = compute_batch(model, prep, params, lo, hi)
        ledger.extend(write_chunks(root, arrays, values, b, lo, hi))
        prompts.extend(prompt_records(prep, lo, hi, metrics))
    path = mdir / f"{shard.label}.json"
    manifest = {
        "format": MANIFEST_FORMAT,
        "params_hash": phash,
        "params": params,
        "shard": shard.index,
        "n_shards": shard.count,
        "n_prompts": n,
        "seq_len": seq,
        "n_chunks": n_chunks,
        "chunks": [first, stop],
        "model": model_record(model),
        "arrays": [
            {"side": side, "hook": hook, "shape": list(shape), "dtype": dt}
            for (side, hook), (shape, dt) in shapes.items()
        ],
        "prompts": prompts,
        "ledger": ledger,
        "wall_s": time.monotonic() - started,
    }
    zarrays.write_durably(path, json.dumps(manifest).encode())
    return pl.DataFrame(
        [{"params_hash": phash, "shard": shard.index, "n_shards": shard.count,
          "prompt_start": min(n, first * batch), "prompt_stop": min(n, stop * batch),
          "n_chunks": stop - first, "manifest": str(path)}]
    )  # fmt: skip


# ---- merge ---------------------------------------------------------------------------------


def merge(store: Store) -> pl.DataFrame:
    """Fold every shard manifest into the catalog; one row per sharded run with its status.

    With nothing left to merge, the runs merged before are listed (a rerun is a no-op). The
    catalog of a store that only shards have written so far (`Store(path, create=True)`) is
    made here. The store's writer lock is shared (a caller inside `with store.writer():`)."""
    check_store(store, "merge")
    manifests = store.path / MANIFESTS
    groups = sorted(manifests.glob("run-*")) if manifests.is_dir() else []
    merged = sorted((manifests / MERGED).glob("run*-*")) if manifests.is_dir() else []
    if not groups and not merged:
        raise UsageError(
            f"no shard manifests under {manifests}; run actstore ingest … --shard i/N first"
        )
    with store.writer("actstore merge"):
        if not groups:
            return pl.DataFrame([_merged_row(store, archive) for archive in merged])
        return pl.DataFrame([_merge_run(store, group) for group in groups])


def _merged_row(store: Store, archive: Path) -> dict[str, Any]:
    """A run an earlier merge completed, as `merge` reported it then."""
    run_id, phash = archive.name.removeprefix("run").split("-", 1)
    shards = len(list(archive.glob("shard-*-of-*.json")))
    status = store._trusted_query("SELECT status FROM runs WHERE run_id = ?", [int(run_id)])[
        "status"
    ]
    return {"run_id": int(run_id), "params_hash": phash, "n_shards": shards,
            "shards_present": shards, "missing": "",
            "status": status.item() if status.len() else "missing from the catalog"}  # fmt: skip


def _load_manifests(mdir: Path) -> list[dict]:
    manifests = []
    for path in sorted(mdir.glob("shard-*-of-*.json")):
        manifest = json.loads(path.read_text())
        if manifest.get("format") != MANIFEST_FORMAT:
            raise ActstoreError(f"{path}: unknown manifest format; rerun that shard")
        manifests.append(manifest)
    counts = sorted({m["n_shards"] for m in manifests})
    if len(counts) > 1:
        raise ActstoreError(
            f"{mdir} holds manifests of different shard counts {counts}; delete the stale ones "
            "and rerun those shards"
        )
    return manifests


def _merge_run(store: Store, mdir: Path) -> dict[str, Any]:
    phash = mdir.name.removeprefix("run-")
    manifests = _load_manifests(mdir)
    if not manifests:
        return {"run_id": None, "params_hash": phash, "n_shards": 0, "shards_present": 0,
                "missing": "all", "status": "no manifests"}  # fmt: skip
    first = manifests[0]
    count = first["n_shards"]
    present = sorted(m["shard"] for m in manifests)
    missing = sorted(set(range(count)) - set(present))
    _check_model(store, first["model"])
    root = store.arrays_root
    fs = root.filesystem()
    staged = root.key(staged_name(phash))
    run_id, merged = _claim_run(store, first, phash, fs.exists(staged))
    row = {"run_id": run_id, "params_hash": phash, "n_shards": count,
           "shards_present": len(present), "missing": ",".join(map(str, missing))}  # fmt: skip
    if merged:
        _archive(mdir, run_id)
        return {**row, "status": "complete"}
    if missing:
        return {**row, "status": "ingesting"}
    ledger = _check_coverage(manifests)
    target = root.key(zarrays.run_group(run_id))  # holds zarrays.array_name(run_id, side, hook)
    # every shard has finished: a temporary file left in the staged arrays is a killed write's
    zarrays.remove_partial_files(root, staged_name(phash))
    if fs.exists(staged):
        _move(fs, root, staged, target)
    elif not fs.exists(target):
        raise ActstoreError(f"run {run_id}: staged arrays {staged} are missing; rerun every shard")
    _record_run(store, run_id, manifests, ledger)
    _archive(mdir, run_id)
    return {**row, "status": "complete"}


def _move(fs: Any, root: ArraysRoot, staged: str, target: str) -> None:
    """Move the staged arrays to the run's group. Locally one rename. An object store has no
    rename: copy every object over the target, then delete the staged ones, so that a merge
    killed at any point leaves each object in the target or still staged, and rerunning merge
    copies what is left (identical bytes) and finishes."""
    if root.is_local:
        if fs.exists(target):
            fs.rm(target, recursive=True)
        fs.mv(staged, target, recursive=True)
        return
    prefix = fs._strip_protocol(staged)
    objects = fs.find(staged)
    fs.copy(objects, [f"{target}{key[len(prefix) :]}" for key in objects])
    fs.rm(staged, recursive=True)


def _check_model(store: Store, model: dict) -> None:
    """The fingerprint check a shard could not make: one model per store."""
    for row in store._trusted_query("SELECT model, fingerprint FROM models").to_dicts():
        if row["fingerprint"] != model["fingerprint"]:
            raise UsageError(
                f"store {store.path} holds activations of model {row['model']!r}; the shards "
                f"ran {model['model']!r}, a different model: ingest them into a new store"
            )


def _claim_run(store: Store, manifest: dict, phash: str, staged: bool) -> tuple[int, bool]:
    """The run id the shards fill (an interrupted run with equal parameters, or a new one), and
    whether a previous merge already completed it."""
    with store.transaction() as tx:
        latest = tx.latest_run(phash, ["complete", "ingesting", "failed"])
        status = None if latest is None else tx.run_status(latest)
        if status == "complete" and not staged:
            return latest, True
        if status in ("ingesting", "failed"):
            run_id = latest
            tx.resume_run(run_id)
        else:
            run_id = tx.new_run(manifest["params"], phash, manifest["n_prompts"],
                                manifest["seq_len"])  # fmt: skip
        tx.add_model(manifest["model"])
    return run_id, False


def _check_coverage(manifests: list[dict]) -> list[dict]:
    """Every (side, hook, chunk) of the run exactly once across the shards' ledgers."""
    first = manifests[0]
    keys = [(a["side"], a["hook"]) for a in first["arrays"]]
    expected = {(side, hook, b) for side, hook in keys for b in range(first["n_chunks"])}
    ledger = [row for m in manifests for row in m["ledger"]]
    seen = [(row["side"], row["hook"], row["chunk_idx"]) for row in ledger]
    if len(seen) != len(set(seen)) or set(seen) != expected:
        raise ActstoreError(
            f"shard ledgers of run {first['params_hash']} cover {len(set(seen))} of "
            f"{len(expected)} chunks ({len(seen)} rows); rerun the shards"
        )
    return ledger


def _record_run(store: Store, run_id: int, manifests: list[dict], ledger: list[dict]) -> None:
    """Prompts, chunk ledger and arrays rows of the merged run, and its completion: one
    transaction."""
    first = manifests[0]
    keys = [(a["side"], a["hook"]) for a in first["arrays"]]
    arrays = array_records(store.path, run_id, keys, first["n_chunks"])
    with store.transaction() as tx:
        tx.clear_run(run_id)
        tx.record_batches(run_id, [p for m in manifests for p in m["prompts"]], ledger)
        tx.finish_run(run_id, arrays, first["n_chunks"], max(m["wall_s"] for m in manifests))


def _archive(mdir: Path, run_id: int) -> None:
    """Move a merged run's manifests aside so that later merges skip them (kept as a record)."""
    target = mdir.parent / MERGED / f"run{run_id}-{mdir.name.removeprefix('run-')}"
    target.parent.mkdir(parents=True, exist_ok=True)
    if target.exists():
        for old in target.iterdir():
            old.unlink()
        target.rmdir()
    os.replace(mdir, target)
