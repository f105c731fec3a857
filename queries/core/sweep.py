"""Sums over a run's prompt batches, in this process or as tasks on dask.distributed.

Patching effects, attribution scores and a circuit's faithfulness are sums over prompts. With
`workers` (a LocalCluster of that many single-threaded processes, actstore/core/cluster.py) or
`scheduler` (a running cluster whose workers see STORE at the same path) each batch of prompts
becomes a Dask task, run on one torch thread, returning its partial sums. The caller adds the
partial sums in the batches' order, whatever order the tasks finish in, so the result does not
depend on the number of workers or on scheduling; against a single process it differs only by the
float32 rounding of forwards (and backwards) run on one thread instead of several: patching effects
within 1e-6, attribution scores within 1e-5 of the set's largest |score|, faithfulness within 1e-5
and the circuit's metric within 1e-5 relative (tested in tests/test_sweeps.py). The parameters
recorded with the query do not include the cluster, so a query asked with any number of workers is
found again by any other.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from actstore.core.errors import ActstoreError, UsageError
from actstore.core.extras import check_engine

# What a LocalCluster's workers import beside actstore.core.cluster.PRELOAD before they fork.
WORKER_MODULES = ["queries.core.engine", "queries.core.reader"]


def check_cluster(workers: int | None, scheduler: str | None) -> None:
    if workers is not None and workers < 1:
        raise UsageError(f"--workers {workers}: need at least 1 worker")
    if workers is not None or scheduler is not None:
        check_engine("distributed")


@contextmanager
def cluster(workers: int | None, scheduler: str | None) -> Iterator[Any]:
    """A Dask client for the sweep, or None to run it in this process."""
    if workers is None and scheduler is None:
        yield None
        return
    from distributed import Client

    from actstore.core.cluster import local_cluster

    local = None
    try:
        if scheduler is None:
            local = local_cluster(workers, WORKER_MODULES)
            client = Client(local)
        else:
            client = Client(scheduler, timeout="10s")
    except (OSError, TimeoutError) as exc:
        if local is not None:
            local.close()
        where = scheduler or "a local cluster"
        raise ActstoreError(f"cannot reach Dask at {where}: {exc}") from None
    try:
        yield client
    finally:
        client.close()
        if local is not None:
            local.close()


def in_order(
    client: Any,
    local: Callable[[Any], Any],
    task: Callable[..., Any],
    items: Sequence[Any],
    *args: Any,
) -> Iterable[Any]:
    """Per item, `local(item)` in this process (lazily) when `client` is None, else
    `task(item, *args)` as a Dask task on one torch thread; always in the order of `items`.

    `task` must be a module-level function that opens what it needs from `args` (a store's
    location, a run id): it runs in another process, perhaps on another machine.
    """
    if client is None:
        return map(local, items)
    futures = [client.submit(_one_thread, task, item, *args, pure=False) for item in items]
    try:
        return client.gather(futures)
    finally:
        client.cancel(futures)


def _one_thread(task: Callable[..., Any], item: Any, *args: Any) -> Any:
    """A task on a worker: one torch thread, so that its sums do not depend on the machine."""
    import torch

    torch.set_num_threads(1)
    return task(item, *args)
