"""Patching sweeps on dask.distributed: each prompt batch a task on real worker processes, the
partial sums added in batch order; the effects equal a single process's within float32 rounding
and do not depend on the number of workers."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import actstore
from actstore.errors import UsageError

# Dask worker processes: the whole suite runs these, `make check` does not.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def copies(ioi_store, tmp_path_factory):
    """Two writable copies of the session's IOI store (queries are recorded in them)."""
    root = tmp_path_factory.mktemp("sweeps")
    return [shutil.copytree(ioi_store, root / name) for name in ("single", "dask")]


def test_head_sweep_on_dask_equals_one_process(copies, toy_random, dask_cluster):
    single, dask = (actstore.open(p) for p in copies)
    ours = dask.patch(1, "head-pos", positions=[0, 5], batch_size=4, scheduler=dask_cluster)
    theirs = single.patch(1, "head-pos", positions=[0, 5], batch_size=4, model=toy_random)
    assert ours.height == theirs.height == 4 * 4 * 2  # layers × heads × positions
    for column in ("value", "normalized"):
        np.testing.assert_allclose(ours[column], theirs[column], rtol=0, atol=1e-6)
    assert ours.select("layer", "head", "pos").equals(theirs.select("layer", "head", "pos"))
    # recorded like any query: asked again, read from the catalog
    assert dask.patch(1, "head-pos", positions=[0, 5], batch_size=4).equals(ours)
    # another batch count and scheduling: partial sums are added in batch order
    again = dask.patch(1, "head-pos", positions=[0, 5], batch_size=4, recompute=True,
                       scheduler=dask_cluster)  # fmt: skip
    assert again.drop("query_id").equals(ours.drop("query_id"))


def test_bad_worker_count():
    with pytest.raises(UsageError, match="--workers 0"):
        from queries.core.sweep import check_cluster

        check_cluster(0, None)
