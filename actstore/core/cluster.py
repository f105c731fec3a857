"""LocalClusters for `--workers N`: single-threaded worker processes that fork with the model
stack already imported.

A spawned Dask worker imports torch and TransformerLens afresh, seconds of CPU per worker on a
small machine, paid again by every command with `--workers`. Workers fork instead from
multiprocessing's forkserver, which imports the stack once per process (PRELOAD and the caller's
modules); a worker that Dask restarts after a crash spawns afresh. Ingest and the query sweeps
start their clusters here.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Sequence
from typing import Any

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
