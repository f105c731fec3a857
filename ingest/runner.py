"""The ingest runner: run a model on clean and corrupted prompts, write activations batch by batch.

Order of events for each batch: run both sides, write every array's chunk, make the chunks
durable, then record prompts and chunk ledger rows in one catalog transaction. A killed ingest
therefore leaves whole batches recorded or not at all, and rerunning the same command resumes at
the first batch the ledger lacks. The writing (chunks, fsync, transaction) runs on a background
thread, in batch order, while the model computes the next batch (ingest.background).
"""

from __future__ import annotations

import errno
import math
import shutil
import time
from contextlib import ExitStack

import numpy as np
import polars as pl

from actstore.core import arrays as zarrays
from actstore.core.errors import ActstoreError, UsageError, first_line
from actstore.core.output import progress_bar
from actstore.core.runtime import Runtime
from actstore.core.store import Store, check_store
from actstore.core.writes import array_records
from actstore.model.adapter import ModelAdapter, load_model, model_record
from actstore.model.converted import save_converted
from actstore.model.derivable import derivable
from ingest.background import BatchWriter
from ingest.batches import (
    array_shapes,
    compute_batch,
    create_arrays,
    params_hash,
    write_chunks,
)
from ingest.corruptions import NOISE_SIGMAS, check_corruption, embedding_sigma
from ingest.distributed import (
    Manifest,
    Pool,
    check_scale_options,
    cluster,
    run_batches,
    start_forkserver,
)
from ingest.layout import resolve_hooks
from ingest.preflight import check_ingest
from ingest.prompts import (
    DEFAULT_N,
    Prepared,
    load_pairs,
    prepare,
    prompt_records,
    role_summary,
)
from ingest.shards import ingest_shard, parse_shard
from ingest.tasks import get_task


def ingest(
    store: Store,
    model: str | ModelAdapter = "toy",
    task: str | None = None,
    n: int | None = None,
    corruption: str = "str",
    hooks: str | None = None,
    dataset: str | None = None,
    dtype: str = "float32",
    batch_size: int = 32,
    seed: int = 0,
    shard: str | None = None,
    restart: bool = False,
    again: bool = False,
    arrays_url: str | None = None,
    runtime: Runtime = Runtime(),
) -> pl.DataFrame:
    """Ingest a task (or a dataset file) into a store; returns the run's `runs` row, with an
    `outcome` column: new, resumed, restarted, or existing.

    A complete run with the same parameters is returned as it is (`again=True` makes a new run
    instead); an interrupted one is resumed, or with `restart=True` discarded and ingested again
    under the same run id. With `shard="i/N"` only shard i's chunks are written and a manifest
    replaces the catalog writes (see ingest.shards); returns the shard's row.

    `store` is a Store; a new one (`Store(path, create=True)`) is made by this ingest's first
    write, after every input is checked, so a refused ingest leaves nothing behind. Its writer
    lock is shared (inside `with store.writer():`). `model` is a model spec for `load_model`, or
    an already loaded ModelAdapter. With the runtime's `workers` or `scheduler` the batches run
    as tasks on dask.distributed (see ingest.distributed); `arrays_url` (`s3://bucket/prefix`, a
    new store only) keeps the arrays in object storage.
    """
    check_store(store, "ingest")
    device, progress = runtime.device, runtime.progress
    workers, scheduler = runtime.workers, runtime.scheduler
    spec = model if isinstance(model, str) else None
    source = check_ingest(store, spec, task, n, dataset, dtype, batch_size, device, seed, shard,
                          hooks, restart, again)  # fmt: skip
    check_corruption(corruption)
    check_scale_options(store.path, workers, scheduler, arrays_url, shard)
    start_forkserver(workers, scheduler)
    part = parse_shard(shard) if shard is not None else None
    with ExitStack() as held:
        if store.exists and part is None:  # a new store is made only once the inputs are good
            held.enter_context(store.writer())
        local_arrays, pool = arrays_url is None and store.arrays_root.is_local, None
        if workers is not None or scheduler is not None:  # workers load the model meanwhile
            spec = model if isinstance(model, str) else model.spec
            pool = held.enter_context(cluster(workers, scheduler, spec, device))
        adapter = model if isinstance(model, ModelAdapter) else load_model(model, device, source)
        if store.exists:
            _check_same_model(store, adapter)
        hook_names = resolve_hooks(adapter, hooks)
        save_converted(adapter)  # queries of this run then load without the bridge
        if dataset is None:  # before generating maybe millions of prompts: a sample's length
            sample = get_task(task).generate(min(n or DEFAULT_N, 16), seed, adapter)
            seq = max(len(adapter.tokenize(p.clean)) for p in sample)
            if local_arrays:
                n_guess = n or DEFAULT_N
                _check_space(store, adapter, hook_names, dtype, corruption, n_guess, seq)
        task_name, pairs, source = load_pairs(adapter, task, dataset, n, seed)
        if not pairs:
            raise UsageError("the dataset holds no prompt pairs")
        prepared = prepare(adapter, pairs, corruption)
        n_pairs, seq = prepared.clean.shape
        if local_arrays:  # object storage is not this disk
            _check_space(store, adapter, hook_names, dtype, corruption, n_pairs, seq)
        params = {
            "model": adapter.spec,
            "fingerprint": adapter.fingerprint,
            "task": task_name,
            "n": n_pairs,
            "corruption": corruption,
            "hooks": hook_names,
            "derived": derivable(hook_names, adapter.shape.n_layers, adapter.architecture.parallel),
            "dtype": dtype,
            "batch_size": min(batch_size, n_pairs),  # a chunk never pads beyond the prompts
            "seed": seed,
            "seq_len": int(seq),
            "roles": role_summary(prepared),
            **source,
        }
        if corruption == "gaussian":
            params["noise_std"] = NOISE_SIGMAS * embedding_sigma(adapter)
        store.keep_arrays_at(arrays_url)
        if part is not None:
            return ingest_shard(store, part, adapter, prepared, params, progress)
        held.enter_context(store.writer())  # makes a new store (shared when held already)
        return _run(store, adapter, prepared, params, progress, restart, again, pool)


def _check_space(
    store: Store,
    model: ModelAdapter,
    hooks: list[str],
    dtype: str,
    corruption: str,
    n: int,
    seq: int,
) -> None:
    """Refuse an ingest whose activations cannot fit on the disk (even at 2x compression, more
    than real activations reach), counting space that interrupted runs' arrays already hold."""
    params = {"hooks": hooks, "derived": [], "dtype": dtype, "corruption": corruption}
    shapes = array_shapes(model, params, n, seq)
    need = sum(math.prod(shape) * np.dtype(dt).itemsize for shape, dt in shapes.values())
    where = next(p for p in [store.path, *store.path.absolute().parents] if p.exists())
    free = shutil.disk_usage(where).free + _resumable_bytes(store)
    if need > 2 * free:
        raise ActstoreError(
            f"--n {n}: the activations need about {_size(need)} uncompressed ({len(shapes)} arrays "
            f"of {seq} positions), {where} has {_size(free)} free; ingest fewer prompts, fewer "
            "--hooks, or --dtype float16"
        )


def _resumable_bytes(store: Store) -> int:
    """Bytes held by the arrays of interrupted runs (a resume reuses them)."""
    if not store.exists:
        return 0
    runs = store._trusted_query("SELECT run_id FROM runs WHERE status <> 'complete'")
    return sum(
        p.stat().st_size
        for rid in runs["run_id"].to_list()
        for p in zarrays.run_dir(store.path, rid).rglob("*")
        if p.is_file()
    )


def _size(nbytes: float) -> str:
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if nbytes < 1000:
            return f"{nbytes:.1f} {unit}"
        nbytes /= 1000
    return f"{nbytes:.1f} PB"


def _check_same_model(store: Store, adapter: ModelAdapter) -> None:
    rows = store._trusted_query("SELECT model, fingerprint FROM models").to_dicts()
    for row in rows:
        if row["fingerprint"] != adapter.fingerprint:
            raise UsageError(
                f"store {store.path} holds activations of model {row['model']!r}; "
                f"{adapter.spec!r} is a different model: use a new store for it"
            )


def _run(
    store: Store,
    model: ModelAdapter,
    prep: Prepared,
    params: dict,
    progress: bool | None,
    restart: bool = False,
    again: bool = False,
    pool: Pool | None = None,
) -> pl.DataFrame:
    started = time.monotonic()
    phash = params_hash(params)
    n, seq = prep.clean.shape
    shapes = array_shapes(model, params, n, seq)
    # the arrays' root group exists before any run row names it (a kill in between leaves none)
    zroot = zarrays.open_root(store.arrays_root, mode="a")
    with store.transaction() as tx:
        complete = tx.latest_run(phash, ["complete"])
        resumable = tx.latest_run(phash, ["ingesting", "failed"])
        if complete is not None and not again:  # done before: nothing to write
            return _row(store, complete, "existing")
        # A run this command creates (or restarts) is rolled back if the disk fills up.
        created = resumable is None or restart
        outcome = "new" if resumable is None else "restarted" if restart else "resumed"
        if resumable is None:
            run_id = tx.new_run(params, phash, n, seq)
        elif restart:
            run_id = resumable
            tx.restart_run(run_id)
        else:
            run_id = resumable
            tx.resume_run(run_id)
        tx.add_model(model_record(model))
        done = tx.recorded_chunks(run_id)
    if created:
        zarrays.remove_run(store.path, run_id)
    else:
        zarrays.remove_partial_files(store.arrays_root, zarrays.run_group(run_id))
    batch = params["batch_size"]
    n_batches = zarrays.batch_count(n, batch)
    todo = [b for b in range(n_batches) if any((sd, hk, b) not in done for sd, hk in shapes)]
    stored = [n_batches - len(todo)]  # batches recorded so far (the writer thread counts too)
    bar = progress_bar(progress, total=n_batches, initial=stored[0], desc=f"ingest run {run_id}",
                       unit="batch")  # fmt: skip

    def record(done: list[Manifest]) -> None:  # whole batches, each with its prompts and ledger
        with store.transaction() as tx:
            tx.record_batches(run_id, [p for rows, _ in done for p in rows],
                              [c for _, chunks in done for c in chunks])  # fmt: skip
        stored[0] += len(done)
        bar.update(len(done))

    writer: BatchWriter | None = None
    try:
        group = zarrays.run_group(run_id)
        arrays = create_arrays(zroot, group, shapes, batch)
        if pool is None:  # write and record each batch on a thread while the next computes
            writer = BatchWriter(lambda job: _write_batch(store, arrays, prep, job), record)
            for b in todo:
                lo, hi = zarrays.batch_bounds(b, batch, n)
                values, metrics = compute_batch(model, prep, params, lo, hi)
                writer.submit((b, lo, hi, values, metrics))
            writer.close()
        else:
            for done in run_batches(pool, store.arrays_root, group, shapes, model, prep, params,
                                    todo):  # fmt: skip
                record(done)
        bar.close()
        records = array_records(store.path, run_id, list(shapes), n_batches)
        with store.transaction() as tx:
            tx.finish_run(run_id, records, n_batches, time.monotonic() - started)
    except BaseException as exc:
        if writer is not None:
            writer.stop()  # the batch being written lands (or fails) before the run is marked
        bar.close()
        if isinstance(exc, KeyboardInterrupt):
            raise
        err = _fail(store, run_id, exc, rollback=created and _disk_full(exc), kept=stored[0])
        if err is exc:
            raise
        raise err from exc
    return _row(store, run_id, outcome)


def _write_batch(
    store: Store, arrays: dict, prep: Prepared, job: tuple[int, int, int, dict, dict]
) -> Manifest:
    """Write a computed batch's chunks durably; its prompt and ledger rows."""
    b, lo, hi, values, metrics = job
    ledger = write_chunks(store.arrays_root, arrays, values, b, lo, hi)
    return prompt_records(prep, lo, hi, metrics), ledger


def _row(store: Store, run_id: int, outcome: str) -> pl.DataFrame:
    """The run's `runs` row and what this ingest did to it."""
    row = store._trusted_query("SELECT * FROM runs WHERE run_id = ?", [run_id])
    return row.with_columns(pl.lit(outcome).alias("outcome"))


def _disk_full(exc: BaseException) -> bool:
    if isinstance(exc, OSError) and exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return True
    return "No space left on device" in str(exc)


def _fail(
    store: Store, run_id: int, exc: BaseException, rollback: bool, kept: int
) -> BaseException:
    """Leave the store consistent after a failed batch; return the error to raise.

    Disk full on a run this command created: roll it back (catalog rows first, then arrays, so a
    crash in between never leaves ledger rows without chunks) and the store is as before. Any
    other failure, or disk full while resuming: the run is marked failed and keeps its recorded
    batches; rerunning the same command resumes it. If the catalog cannot be written either, the
    run stays `ingesting`, and the message says that instead.
    """
    try:
        with store.transaction() as tx:
            if rollback:
                tx.discard_run(run_id)
            else:
                tx.fail_run(run_id)
        recorded = True
    except Exception:  # the catalog itself may be out of space; the ledger stays authoritative
        recorded = rollback = False
    if rollback:
        zarrays.remove_run(store.path, run_id)
    if not isinstance(exc, (OSError, ActstoreError)) and not _disk_full(exc):
        return exc
    what = "disk full" if _disk_full(exc) else first_line(exc)
    if rollback:
        return ActstoreError(
            f"{what} while writing run {run_id}; the run was rolled back and the store is "
            "unchanged: free space (see actstore info) and rerun"
        )
    if not recorded:
        return ActstoreError(
            f"{what} while writing run {run_id}; the catalog could not be written either, so "
            f"the run stays ingesting with its {kept} stored batches: fix the cause (free "
            "space) and rerun the same command to resume"
        )
    return ActstoreError(
        f"{what} while writing run {run_id}; it keeps {kept} stored batches and is marked "
        "failed: fix the cause and rerun the same command to resume"
    )
