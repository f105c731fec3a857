"""Rerunning an ingest is safe: a complete run with equal parameters is returned, not duplicated;
`--again` makes a new run on purpose."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from test_bad_input import catalog_rows
from test_cli import snapshot

import actstore
from actstore.app.cli import main

SAME = ["--model", "toy-random", "--task", "ioi", "--n", "20", "--batch-size", "8"]


@pytest.fixture
def store(ioi_copy, session_ingest):
    return ioi_copy


def ingest(store, *extra: str):
    return CliRunner().invoke(main, ["ingest", str(store), *SAME, *extra])


def test_a_complete_run_is_returned_and_the_store_is_unchanged(store):
    rows = catalog_rows(store)
    arrays = {k: v for k, v in snapshot(store).items() if not k.startswith("catalog")}
    res = ingest(store)
    assert res.exit_code == 0 and res.stdout.strip() == "1", res.output
    assert res.stderr.strip() == ("run 1: ioi on toy-random, 20 prompts, already complete with "
                                  "these arguments (--again for a new run)")  # fmt: skip
    assert catalog_rows(store) == rows
    assert {k: v for k, v in snapshot(store).items() if not k.startswith("catalog")} == arrays
    row = actstore.open(store).ingest(model="toy-random", task="ioi", n=20, batch_size=8)
    assert row.select("run_id", "status", "outcome").rows() == [(1, "complete", "existing")]


def test_again_makes_a_new_run_and_other_parameters_make_their_own(store):
    res = ingest(store, "--again")
    assert res.exit_code == 0 and res.stdout.strip() == "2", res.output
    assert res.stderr.strip() == "run 2: ioi on toy-random, 20 prompts, complete"
    s = actstore.open(store)
    assert s.runs().select("run_id", "status").rows() == [(1, "complete"), (2, "complete")]
    for hook in ("blocks.3.hook_resid_post", "blocks.2.attn.hook_z"):
        assert np.array_equal(s.read(1, "clean", hook), s.read(2, "clean", hook))
    assert ingest(store).stdout.strip() == "2"  # the latest complete run with these arguments
    assert ingest(store, "--seed", "1").stdout.strip() == "3"
