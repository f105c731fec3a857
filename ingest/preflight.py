"""Checks of an ingest's arguments that need no model, made before torch is imported.

A mistyped flag is refused in a fraction of a second instead of after the model has loaded, and
always before the store is written: numbers the catalog cannot hold, an unknown task, a task
and a dataset together, a malformed dataset file, a device name torch would not know, a --hooks
word that names no hook, a model that cannot load (an unreachable hub included), a store path
that cannot be a store, a store that is read-only or held by another writer.
"""

from __future__ import annotations

from actstore.core.choices import DTYPES, check
from actstore.core.errors import UsageError
from actstore.core.store import Store, check_location
from actstore.model.adapter import check_device_name
from actstore.model.model_spec import check_model_spec
from ingest.layout import check_hooks

INT32_MAX = 2**31 - 1  # the catalog stores counts and seeds as INTEGER


def check_ingest(
    store: Store,
    model: str | None,
    task: str | None,
    n: int | None,
    dataset: str | None,
    dtype: str,
    batch_size: int,
    device: str | None,
    seed: int,
    shard: str | None,
    hooks: str | None = None,
    restart: bool = False,
    again: bool = False,
) -> str | None:
    """Raise a one-line error for the first argument that cannot work; return where the model
    loads from (check_model_spec), None for `model` None (an already loaded model)."""
    if restart and again:
        raise UsageError(
            "give --restart or --again, not both: --restart redoes an interrupted run, --again "
            "makes a new run beside a complete one"
        )
    if n is not None and not 1 <= n <= INT32_MAX:
        raise UsageError(f"--n {n}: need at least one prompt (and at most {INT32_MAX})")
    if not 1 <= batch_size <= INT32_MAX:
        raise UsageError(f"--batch-size {batch_size}: need at least 1 (and at most {INT32_MAX})")
    if not 0 <= seed <= INT32_MAX:
        raise UsageError(f"--seed {seed}: choose a seed from 0 to {INT32_MAX}")
    check("--dtype", dtype, DTYPES)
    check_device_name(device)
    if task is not None and dataset is not None:
        raise UsageError(
            "give --task or --dataset, not both: a dataset file's runs are named after the file"
        )
    if dataset is not None:
        from ingest.datasets import check_dataset_file

        check_dataset_file(dataset)
    elif task is None:
        raise UsageError("give --task NAME or --dataset FILE")
    else:
        from ingest.tasks import get_task

        get_task(task)
    check_hooks(hooks)
    if shard is not None:
        from ingest.shards import parse_shard

        parse_shard(shard)
    check_location(store.path, create=True)  # a Store opened to read may be ingested into
    if shard is None:
        store.check_writable()
    return None if model is None else check_model_spec(model)
