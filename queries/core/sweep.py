"""Sums over a run's prompt batches, in this process or as tasks on dask.distributed.

Patching effects, attribution scores, a circuit's faithfulness and path effects are sums over
prompts. With a Runtime's `workers` or `scheduler` (actstore/core/runtime.py: a LocalCluster of
single-threaded processes, actstore/core/cluster.py, or a running cluster whose workers see the
store at the same location) each batch of prompts becomes a Dask task, run on one torch thread,
returning its partial sums. Each worker keeps one run context (store, model, engine, reader) for
the (location, run, device) it last served, so a sweep loads the model and opens the run once
per worker, not once per task. The caller adds the partial sums in the batches' order, whatever
order the tasks finish in (progress is reported as they finish), so the result does not depend on
the number of workers or on scheduling; against a single process it differs only by the float32
rounding of forwards (and backwards) run on one thread instead of several: patching effects
within 1e-6, attribution scores within 1e-5 of the set's largest |score|, faithfulness within 1e-5
and the circuit's metric within 1e-5 relative (tested in tests/test_sweeps.py). The parameters
recorded with the query do not include the runtime, so a query asked with any number of workers
is found again by any other.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import numpy as np

from actstore.core.cluster import CONNECT_TIMEOUT_S, check_scheduler
from actstore.core.errors import ActstoreError
from actstore.core.extras import check_engine
from actstore.core.runtime import Runtime
from actstore.core.store import Store

if TYPE_CHECKING:
    from actstore.model.adapter import ModelAdapter
    from queries.core.engine import Engine
    from queries.core.reader import Reader

# What a LocalCluster's workers import beside actstore.core.cluster.PRELOAD before they fork.
WORKER_MODULES = ["queries.core.engine", "queries.core.reader"]
WAIT_FOR_WORKERS_S = 600  # how long a scheduler may take to gather --workers N


def check_cluster(runtime: Runtime) -> None:
    """Refuse, before any model loads, a runtime whose cluster cannot be used: dask.distributed
    missing or mismatched, or a scheduler address where nothing listens."""
    if not runtime.distributed:
        return
    check_engine("distributed")
    if runtime.scheduler is not None:
        check_scheduler(runtime.scheduler)


@contextmanager
def cluster(runtime: Runtime) -> Iterator[Any]:
    """The Dask client for the runtime's sweep, or None to run it in this process."""
    if not runtime.distributed:
        yield None
        return
    from distributed import Client

    from actstore.core.cluster import local_cluster

    local = None
    where = runtime.scheduler or "a local cluster"
    try:
        if runtime.scheduler is None:
            local = local_cluster(runtime.workers, WORKER_MODULES)
            client = Client(local)
        else:
            client = Client(runtime.scheduler, timeout=f"{CONNECT_TIMEOUT_S}s")
            if runtime.workers is not None:
                client.wait_for_workers(runtime.workers, timeout=WAIT_FOR_WORKERS_S)
    except (OSError, TimeoutError) as exc:
        if local is not None:
            local.close()
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
    done: Callable[[], Any] | None = None,
) -> Iterable[Any]:
    """Per item, `local(item)` in this process (lazily) when `client` is None, else
    `task(item, *args)` as a Dask task on one torch thread; always yielded in the order of
    `items`, each as soon as it and those before it are there. `done()` is called as each item
    finishes, in whatever order (a progress bar's tick).

    `task` must be a module-level function that opens what it needs from `args` (a store's
    location, a run id; `run_context` keeps them per worker): it runs in another process,
    perhaps on another machine.
    """
    if client is None:
        return _local(local, items, done)
    return _gathered(client, task, items, args, done)


def _local(local: Callable[[Any], Any], items: Sequence[Any], done: Callable[[], Any] | None):
    for item in items:
        result = local(item)
        if done is not None:
            done()
        yield result


def _gathered(
    client: Any, task: Callable[..., Any], items: Sequence[Any], args: tuple,
    done: Callable[[], Any] | None,
) -> Iterator[Any]:  # fmt: skip
    from distributed import as_completed

    futures = [client.submit(_one_thread, task, item, *args, pure=False)
               for item in items]  # fmt: skip
    index = {future.key: i for i, future in enumerate(futures)}
    finished: dict[int, Any] = {}
    following = 0
    try:
        for future in as_completed(futures):
            finished[index[future.key]] = future.result()
            if done is not None:
                done()
            while following in finished:
                yield finished.pop(following)
                following += 1
    finally:
        client.cancel(futures)


def _one_thread(task: Callable[..., Any], item: Any, *args: Any) -> Any:
    """A task on a worker: one torch thread, so that its sums do not depend on the machine, and
    one task at a time on a worker of several threads (its tasks share the run context)."""
    import torch

    torch.set_num_threads(1)
    with _task_lock:
        return task(item, *args)


@dataclass(frozen=True, eq=False)
class RunContext:
    """What every task of one run shares on a worker: the store, the run's row, its model, the
    engine and the reader (which reads each task's prompt columns for its span alone), and the
    prompts' role positions asked so far (each set read once, not per task)."""

    store: Store
    run: dict
    model: ModelAdapter
    engine: Engine
    reader: Reader
    _positions: dict[tuple[str, ...], np.ndarray] = field(default_factory=dict, repr=False)

    def positions(self, roles: Sequence[str]) -> np.ndarray:
        """Each prompt's position of each role (n_prompts, n_roles): actstore.core.roles's
        `positions`, read on the first ask."""
        key = tuple(roles)
        if key not in self._positions:
            from actstore.core.roles import positions

            self._positions[key] = positions(self.store, int(self.run["run_id"]), key)
        return self._positions[key]

    @classmethod
    def of(cls, store: Store, run: int | dict, model: ModelAdapter) -> RunContext:
        """The context of a run in this process, on a model already loaded."""
        from queries.core.engine import Engine
        from queries.core.reader import Reader

        row = store.run(run) if isinstance(run, int) else run
        engine = Engine.from_adapter(model)
        return cls(store, row, model, engine, Reader(store, row, model.device, engine))


_contexts: dict[tuple[str, int, str | None], RunContext] = {}
_contexts_lock = threading.Lock()
_task_lock = threading.Lock()


def run_context(location: str, run: int, device: str | None) -> RunContext:
    """The worker's context for (location, run, device), made on its first task and reused by
    the next ones; only the last is kept (memory: one model)."""
    key = (location, run, device)
    with _contexts_lock:
        context = _contexts.get(key)
        if context is None:
            from queries.core.run_model import model_for_run

            store = Store(location)
            row = store.run(run)
            _contexts.clear()
            context = _contexts[key] = RunContext.of(store, row, model_for_run(row, device))
        return context
