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


@pytest.mark.slow  # five query verbs computed twice or more: over a minute on 2 cores
def test_every_query_verb_recomputes_on_request_and_the_newest_supersedes(store, tmp_path):
    """Asked again, each query verb answers from the catalog; with --recompute it records a
    new query, which the views show instead of the old one."""
    np.save(tmp_path / "v.npy", np.eye(64)[:1])
    hook = "blocks.1.hook_resid_pre"
    verbs = {
        "patch": ["--run", "1", "--component", "head", "--top", "3"],
        "attribute": ["--run", "1", "--method", "eap", "--top", "3"],
        "subspace": ["--run", "1", "--hook", hook, "--basis", str(tmp_path / "v.npy"),
                     "--pos", "final"],
        "reduce": ["--run", "1", "--hook", hook],
        "path": ["--run", "1", "--senders", "a0.h1", "--receivers", "logits"],
        "intervene": ["--run", "1", "--heads", "a1.h0", "--attend", "IO"],
    }  # fmt: skip
    ids = {}
    for verb, args in verbs.items():
        first, same, again = (
            CliRunner().invoke(main, [verb, str(store), *args, *extra, "--format", "csv"])
            for extra in ([], [], ["--recompute"])
        )
        for res in (first, same, again):
            assert res.exit_code == 0, (verb, res.output)
        assert first.stdout == same.stdout, verb
        column = "score_id" if verb == "attribute" else "query_id"
        new, old = ({int(line.split(",")[0]) for line in res.stdout.splitlines()[1:]}
                    for res in (again, first))  # fmt: skip
        assert first.stdout.splitlines()[0].split(",")[0] == column
        assert len(new) == len(old) == 1 and new != old, verb
        ids[verb] = (old.pop(), new.pop())
    patched = CliRunner().invoke(main, ["patch", str(store), *verbs["patch"], "--format", "csv"])
    rows = patched.stdout.splitlines()[1:]
    importance = [float(line.split(",")[-1]) for line in rows]
    assert len(rows) == 3 and importance == sorted(importance, reverse=True)
    circuit = ["circuit", str(store), "--scores", str(ids["attribute"][1]), "--edges", "5",
               "--format", "csv"]  # fmt: skip
    first, again = (CliRunner().invoke(main, circuit + extra) for extra in ([], ["--recompute"]))
    assert first.exit_code == 0 and again.exit_code == 0, (first.output, again.output)
    ids["circuit"] = tuple(int(r.stdout.splitlines()[1].split(",")[0]) for r in (first, again))
    assert ids["circuit"][0] != ids["circuit"][1]
    s = actstore.open(store)
    current = set(s.sql("select query_id from current_queries")["query_id"])
    for verb, (old, new) in ids.items():
        assert new in current and old not in current, verb
    shown = set(s.sql("select distinct query_id from patch_effects")["query_id"])
    assert ids["patch"][1] in shown and ids["patch"][0] not in shown


def test_an_ingest_validates_its_arguments_once(ioi_copy, monkeypatch):
    """The CLI hands the arguments to ingest(), which checks them once: the argument checks,
    the scale options (a scheduler's or an S3 server's probe) and the model spec (a hub probe)
    each run one time, not once in the CLI and again in the runner and the loader."""
    import actstore.model.adapter as adapter
    import ingest.distributed as distributed
    import ingest.preflight as preflight
    import ingest.runner as runner

    calls = {"check_ingest": 0, "check_scale_options": 0, "check_model_spec": 0}

    def counting(module, name):
        real = getattr(module, name)

        def wrapper(*args, **kwargs):
            calls[name] += 1
            return real(*args, **kwargs)

        return wrapper

    checks = [(preflight, "check_ingest"), (runner, "check_ingest"),
              (distributed, "check_scale_options"), (runner, "check_scale_options"),
              (preflight, "check_model_spec"), (adapter, "check_model_spec")]  # fmt: skip
    for module, name in checks:
        monkeypatch.setattr(module, name, counting(module, name))
    res = ingest(ioi_copy)  # the model loads for real: its loader would check the spec again
    assert res.exit_code == 0 and res.stdout.strip() == "1", res.output
    assert calls == {"check_ingest": 1, "check_scale_options": 1, "check_model_spec": 1}


def test_ingest_repair_and_merge_work_inside_the_writer(ioi_copy, session_ingest):
    """A script holding the writer lock (`with store.writer():`) can ingest, repair and merge
    through the same store object: they share its lock instead of refusing it as another
    writer's."""
    from actstore.core.errors import UsageError

    store = actstore.open(ioi_copy)
    with store.writer("a script"):
        row = store.ingest(model="toy-random", task="ioi", n=20, batch_size=8)
        assert row.select("run_id", "outcome").rows() == [(1, "existing")]
        assert store.repair(1).height == 0  # nothing damaged
        with pytest.raises(UsageError, match="no shard manifests"):
            store.merge()
