"""Ingest on dask.distributed: a run's batches become tasks on a cluster's workers.

`actstore ingest … --workers N` starts a LocalCluster of N single-threaded worker processes;
`--scheduler ADDRESS` uses a running cluster instead. The coordinating process (the command)
stays the store's single writer, exactly as in a single-process ingest: it holds the writer
lock, claims the run, creates its arrays and submits one task per batch the chunk ledger lacks.
A task computes its batch on a worker (the model is loaded once per worker process), writes the
batch's chunks (one writer per chunk) and returns its manifest: the prompt rows and chunk-ledger
rows with checksums. The coordinator records each returned manifest in the catalog with the
same write verbs as a single-process ingest, and marks the run complete when the ledger holds
every chunk.

So the store is bit-identical to a single-process ingest; a task whose worker dies is rerun by
the scheduler; a killed coordinator leaves whole batches recorded, and rerunning the same
command resumes at the batches the ledger lacks (like any interrupted ingest).
"""

from __future__ import annotations

import os
import time
import uuid
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actstore.core.cluster import CONNECT_TIMEOUT_S, check_scheduler
from actstore.core.errors import ActstoreError, UsageError
from actstore.core.extras import check_engine
from actstore.core.location import (
    ArraysRoot,
    arrays_root,
    check_arrays_url,
    check_claim,
    check_no_lost_catalog,
    local_dir,
    normal_url,
)
from ingest.background import RECORD_EVERY_S

if TYPE_CHECKING:
    from actstore.model.adapter import ModelAdapter
    from ingest.batches import Shapes
    from ingest.prompts import Prepared

# What a LocalCluster's workers import beside actstore.core.cluster.PRELOAD before they fork.
WORKER_MODULES = ["ingest.batches"]
TASK_RETRIES = 1  # an exception (a transient object-store error) reruns a task once
Manifest = tuple[list[dict[str, Any]], list[dict[str, Any]]]  # prompt rows, ledger rows


def check_scale_options(
    store: str | Path,
    workers: int | None,
    scheduler: str | None,
    arrays_url: str | None,
    shard: str | None,
) -> None:
    """One-line refusals, before torch is imported and before the store is touched: worker
    counts, scheduler addresses nobody answers at, unusable or unreachable arrays URLs."""
    if workers is not None and workers < 1:
        raise UsageError(f"--workers {workers}: need at least 1 worker")
    if workers is not None or scheduler is not None:
        check_engine("distributed")
    if shard is not None and (workers is not None or scheduler is not None):
        raise UsageError(
            "--shard runs one shard by hand; --workers/--scheduler run every batch as a Dask "
            "task: give one or the other"
        )
    if scheduler is not None:
        check_scheduler(scheduler)
    store_dir = local_dir(store)
    check_arrays_url(store_dir, arrays_url)
    url = arrays_url or arrays_root(store_dir).url
    if "://" in url:
        from actstore.core.object_store import probe

        probe(url)
        check_claim(store_dir, url)
    if shard is None:
        check_no_lost_catalog(store_dir, ArraysRoot(normal_url(url)))


@dataclass
class Pool:
    """A Dask client being connected (in the background for a LocalCluster, whose workers
    start while this process loads the model and prepares the prompts)."""

    started: Future  # of (client, LocalCluster or None, warm-up futures)
    model: str
    device: str | None
    remote: bool  # an existing cluster, whose workers may run on other machines
    background: ThreadPoolExecutor
    closed: bool = False

    @property
    def client(self) -> Any:
        return self.started.result()[0]

    def release(self) -> None:
        """Disconnect (and stop a LocalCluster) in the background: the last batches are in, and
        the coordinator's closing catalog work need not wait for the workers to shut down."""
        if not self.closed and self.started.done() and self.started.exception() is None:
            self.closed = True
            self.background.submit(_close, *self.started.result()[:2])


def _close(client: Any, local: Any) -> None:
    client.close()
    if local is not None:
        local.close()


@contextmanager
def cluster(
    workers: int | None,
    scheduler: str | None,
    model: str,
    device: str | None,
) -> Iterator[Pool]:
    """Connect to `scheduler` (at once, so that a bad cluster fails before the store is
    touched), or start a LocalCluster of `workers` single-threaded processes in the background;
    every worker starts loading the model as soon as it is up."""
    background = ThreadPoolExecutor(1, thread_name_prefix="actstore-cluster")
    if scheduler is None:
        started = background.submit(_connect, workers, None, model, device)
    else:
        started = Future()
        started.set_result(_connect(workers, scheduler, model, device))
    pool = Pool(started, model, device, scheduler is not None, background)
    try:
        yield pool
    finally:
        started.exception()  # wait for the start: a cluster is never left running
        pool.release()
        background.shutdown(wait=True)


def _connect(
    workers: int | None, scheduler: str | None, model: str, device: str | None
) -> tuple[Any, Any, list[Any]]:
    from distributed import Client

    local = None
    try:
        if scheduler is None:
            from actstore.core.cluster import local_cluster

            local = local_cluster(workers or 1, WORKER_MODULES)
            client = Client(local)
        else:
            client = Client(scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
            if workers is not None:
                client.wait_for_workers(workers, timeout=600)
    except (OSError, TimeoutError) as exc:
        if local is not None:
            local.close()
        where = scheduler or f"a local cluster of {workers} workers"
        raise ActstoreError(f"cannot start Dask on {where}: {exc}") from None
    warming = [
        client.submit(_warm, model, device, workers=[address], pure=False)
        for address in client.scheduler_info()["workers"]
    ]
    return client, local, warming


def start_forkserver(workers: int | None, scheduler: str | None) -> None:
    """Start the process a LocalCluster's workers fork from, now (actstore/core/cluster.py): it
    imports the model stack while this process imports its own and loads the model."""
    if workers is not None and scheduler is None:
        from actstore.core.cluster import start_forkserver as start

        start(WORKER_MODULES)


def _check_workers_see(client: Any, directory: Path) -> None:
    """Workers of an existing cluster must reach the store's local arrays at the same path."""
    seen = client.run(os.path.isdir, str(directory.absolute()))
    blind = sorted(address for address, ok in seen.items() if not ok)
    if blind:
        raise ActstoreError(
            f"Dask workers {', '.join(blind)} cannot see {directory.parent}: put STORE on a "
            "filesystem every worker mounts at the same path, or keep the arrays in object "
            "storage (--arrays-url s3://bucket/prefix on a new store)"
        )


def run_batches(
    pool: Pool,
    root: ArraysRoot,
    group: str,
    shapes: Shapes,
    model: ModelAdapter,
    prep: Prepared,
    params: dict,
    todo: list[int],
) -> Iterator[list[Manifest]]:
    """Submit one task per batch in `todo`; yield the manifests of the tasks finished since
    the last yield (whole batches only), at most every RECORD_EVERY_S (a catalog transaction per
    finished batch would cap fast batches at the coordinator's pace), until every task is done.
    An error in a task (after its retry) cancels the others and is raised here; the batches
    finished but not yet yielded are computed again when the run resumes."""
    from distributed import as_completed

    client = pool.client
    if pool.remote and root.is_local:
        _check_workers_see(client, root.local)
    prepared = client.scatter(prep, broadcast=True, hash=False)
    tag = uuid.uuid4().hex[:8]
    spec = (root, group, shapes, pool.model, pool.device, model.fingerprint, params)
    futures = [
        client.submit(_write_batch, spec, prepared, b, key=f"ingest-batch-{b}-{tag}",
                      retries=TASK_RETRIES)
        for b in todo
    ]  # fmt: skip
    pending: list[Manifest] = []
    last = time.monotonic()
    try:
        for finished in as_completed(futures, with_results=True).batches():
            pending += [result for _, result in finished]
            if time.monotonic() - last >= RECORD_EVERY_S:
                yield pending
                pending, last = [], time.monotonic()
    finally:
        client.cancel(futures)
    pool.release()
    if pending:
        yield pending


# ---- on the workers ------------------------------------------------------------------------

_MODELS: dict[tuple[str, str | None], Any] = {}
_ARRAYS: dict[tuple, dict] = {}


def _model(spec: str, device: str | None) -> Any:
    """The model, loaded once per worker process, computing on one thread as the worker does."""
    if (spec, device) not in _MODELS:
        import torch

        from actstore.model.adapter import load_model

        torch.set_num_threads(1)
        _MODELS[(spec, device)] = load_model(spec, device)
    return _MODELS[(spec, device)]


def _warm(spec: str, device: str | None) -> None:
    _model(spec, device)


def _write_batch(spec: tuple, prep: Prepared, b: int) -> Manifest:
    """Compute batch `b` of a run, write its chunks, return its prompt and ledger rows."""
    from actstore.core import arrays as zarrays
    from ingest.batches import compute_batch, create_arrays, write_chunks
    from ingest.prompts import prompt_records

    root, group, shapes, model_spec, device, fingerprint, params = spec
    model = _model(model_spec, device)
    if model.fingerprint != fingerprint:
        raise ActstoreError(
            f"model {model_spec!r} on this Dask worker has other weights than the coordinator's; "
            "give every worker the same model files"
        )
    batch, n = params["batch_size"], params["n"]
    opened = (root.url, group, batch, tuple(sorted(shapes.items())))
    if opened not in _ARRAYS:
        zroot = zarrays.open_root(root, mode="a")
        _ARRAYS[opened] = create_arrays(zroot, group, shapes, batch, replace=False)
    arrays = _ARRAYS[opened]
    lo, hi = zarrays.batch_bounds(b, batch, n)
    values, metrics = compute_batch(model, prep, params, lo, hi)
    ledger = write_chunks(root, arrays, values, b, lo, hi)
    return prompt_records(prep, lo, hi, metrics), ledger
