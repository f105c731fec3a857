"""Sums over a run's prompt batches, in this process or as tasks on dask.distributed.

A patching sweep is a sum over prompts. With `workers` (a LocalCluster of that many
single-threaded processes) or `scheduler` (a running cluster whose workers see STORE at the same
path) each batch of prompts becomes a Dask task returning its partial sums. The partial sums are
added in the batches' order, whatever order the tasks finish in, so the result does not depend
on the number of workers or on scheduling; against a single process it differs only by the
float32 rounding of forwards run on one thread instead of several (tested within 1e-6).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

from actstore.errors import ActstoreError, UsageError


def check_cluster(workers: int | None, scheduler: str | None) -> None:
    if workers is not None and workers < 1:
        raise UsageError(f"--workers {workers}: need at least 1 worker")


@contextmanager
def cluster(workers: int | None, scheduler: str | None) -> Iterator[Any]:
    """A Dask client for the sweep, or None to run it in this process."""
    if workers is None and scheduler is None:
        yield None
        return
    from distributed import Client, LocalCluster

    local = None
    try:
        if scheduler is None:
            local = LocalCluster(
                n_workers=workers, threads_per_worker=1, processes=True,
                dashboard_address=None, silence_logs=logging.ERROR,
            )  # fmt: skip
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


def map_in_order(client: Any, task: Callable[..., Any], items: Sequence[Any], *args: Any) -> list:
    """`[task(item, *args) for item in items]`, as Dask tasks when `client` is given; results
    in the order of `items`."""
    if client is None:
        return [task(item, *args) for item in items]
    futures = [client.submit(task, item, *args, pure=False) for item in items]
    try:
        return client.gather(futures)
    finally:
        client.cancel(futures)
