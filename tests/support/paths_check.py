"""Path patching's fast recompute against the plain full-length recompute it replaces."""

from __future__ import annotations

import numpy as np

from actstore.core.roles import positions
from actstore.core.store import Store
from queries.core.engine import Engine
from queries.core.reader import Reader
from queries.core.run_model import model_for_run
from queries.paths import check_path
from queries.paths.compute import span_sums
from queries.paths.spec import recorded_pairs, run_shape


def assert_fast_is_exact(
    store: Store, senders: str, receivers: str, roles: list[str] | None, direction: str
) -> None:
    """Every (sender, receiver, role) variant's metric, summed over the run's prompts, equals
    the plain recompute's (`fast=False`: every variant at every position of every layer from
    its first receiver's) within 1e-5 while costing fewer FLOPs; the paths move the metric (so
    equal sums mean something). Without roles the senders change every position."""
    params = check_path(store, 1, senders, receivers, roles, "logit-diff", direction)
    shape = run_shape(store, 1)
    chosen = recorded_pairs(params, shape)
    info = store.run(1)
    model = model_for_run(info)
    at = None if roles is None else positions(store, 1, roles)
    assert at is None or at.min() > 0  # every role starts after the first position: a prefix
    got = {}
    for fast in (True, False):
        e = Engine.from_adapter(model)
        reader = Reader(store, info, model.device, e)
        got[fast] = sum(span_sums(e, reader, span, chosen, at, "logit-diff", direction, fast)
                        for span in reader.spans())  # fmt: skip
        got[fast, "flops"] = e.flops
    np.testing.assert_allclose(got[True], got[False], atol=1e-5 * reader.n, rtol=0)
    assert np.ptp(got[False]) > 1e-4  # the variants differ
    assert got[True, "flops"] < 0.9 * got[False, "flops"]
