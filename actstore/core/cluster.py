"""LocalClusters for `--workers N`: single-threaded worker processes that fork with the model
stack already imported.

A spawned Dask worker imports torch and TransformerLens afresh, seconds of CPU per worker on a
small machine, paid again by every command with `--workers`. Workers fork instead from
multiprocessing's forkserver, which imports the stack once per process (PRELOAD and the caller's
modules); a worker that Dask restarts after a crash spawns afresh. Ingest and the query sweeps
start their clusters here, and check a `--scheduler` address here before any work.
"""

from __future__ import annotations

import logging
import socket
import warnings
from collections.abc import Sequence
from typing import Any
from urllib.parse import urlparse

from actstore.core.errors import ActstoreError, UsageError

CONNECT_TIMEOUT_S = 10  # how long a scheduler may take to answer
# What --scheduler took on `reduce` before it meant an address on every verb.
OLD_SCHEDULERS = ("threads", "distributed")

PRELOAD = ["distributed", "numpy", "zarr", "torch", "transformer_lens.model_bridge",
           "actstore.model.adapter"]  # fmt: skip


def start_forkserver(modules: Sequence[str] = ()) -> None:
    """Start the server the workers fork from, now: it imports the model stack while this
    process goes on with its own work (loading the model, preparing prompts), instead of after
    Dask's scheduler is up. The first call in a process fixes what the server imports."""
    import multiprocessing
    from multiprocessing import forkserver

    multiprocessing.get_context("forkserver").set_forkserver_preload([*PRELOAD, *modules])
    forkserver.ensure_running()


def local_cluster(workers: int, modules: Sequence[str] = ()) -> Any:
    """A LocalCluster of `workers` single-threaded processes forked from the server (started
    here unless it runs already), with `modules` imported beside PRELOAD."""
    import dask
    from distributed import LocalCluster

    start_forkserver(modules)
    with (
        dask.config.set({"distributed.worker.multiprocessing-method": "forkserver"}),
        warnings.catch_warnings(),
    ):
        warnings.filterwarnings("ignore", "Port .* is already in use")  # any free port serves
        return LocalCluster(
            n_workers=workers, threads_per_worker=1, processes=True,
            dashboard_address=None, silence_logs=logging.CRITICAL,
        )  # fmt: skip


def check_address(address: str) -> tuple[str, int] | None:
    """A scheduler address's (host, port), refused in one line when malformed (reduce's old
    `threads|distributed` pointed to the new spelling); None for schemes other than tcp
    (tls://, ucx://, …), which the Dask client checks itself."""
    if address in OLD_SCHEDULERS:
        raise UsageError(
            f"--scheduler {address}: --scheduler is now a Dask scheduler's address on every verb "
            "(tcp://HOST:8786, formerly reduce's --address); leave it out to run in this process, "
            "or give --workers N for a local cluster"
        )
    parsed = urlparse(address if "://" in address else f"tcp://{address}")
    if parsed.scheme != "tcp":
        return None
    try:
        host, port = parsed.hostname, parsed.port
    except ValueError:
        host = port = None
    if not host or not port:
        raise UsageError(f"--scheduler {address}: give HOST:PORT, e.g. tcp://10.0.0.5:8786")
    return host, port


def check_scheduler(address: str) -> None:
    """A TCP scheduler address must be well formed and something must listen there."""
    where = check_address(address)
    if where is None:
        return
    try:
        with socket.create_connection(where, timeout=CONNECT_TIMEOUT_S):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise ActstoreError(
            f"--scheduler {address}: no Dask scheduler answers there ({reason}); start one "
            "(dask scheduler) or check the address"
        ) from None
