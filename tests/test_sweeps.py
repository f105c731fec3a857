"""Query sweeps on dask.distributed (patch, attribute, circuit faithfulness): each prompt batch a
task on real worker processes, the partial sums added in batch order; the results equal a single
process's within float32 rounding, are recorded as the same query, and do not depend on the
number of workers."""

from __future__ import annotations

import shutil

import numpy as np
import pytest

import actstore
from actstore.app.cli import main
from actstore.core.errors import UsageError
from actstore.core.runtime import Runtime

# Dask worker processes: the whole suite runs these, `make check` does not.
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def copies(ioi_store, tmp_path_factory):
    """Three writable copies of the session's IOI store (queries are recorded in them)."""
    root = tmp_path_factory.mktemp("sweeps")
    return [shutil.copytree(ioi_store, root / name) for name in ("single", "dask", "again")]


def test_head_sweep_on_dask_equals_one_process(copies, toy_random, dask_cluster):
    single, dask = (actstore.open(p) for p in copies[:2])
    on_dask = Runtime(scheduler=dask_cluster)
    ours = dask.patch(1, "head-pos", positions="S1,END", batch_size=4, runtime=on_dask)
    theirs = single.patch(1, "head-pos", positions="S1,END", batch_size=4, model=toy_random)
    assert ours.height == theirs.height == 4 * 4 * 2  # layers × heads × roles
    for column in ("value", "normalized"):
        np.testing.assert_allclose(ours[column], theirs[column], rtol=0, atol=1e-6)
    keys = ("layer", "head", "pos", "role")
    assert ours.select(keys).equals(theirs.select(keys))
    # recorded like any query: asked again, read from the catalog
    assert dask.patch(1, "head-pos", positions="S1,END", batch_size=4).equals(ours)
    # another batch count and scheduling: partial sums are added in batch order
    again = dask.patch(1, "head-pos", positions="S1,END", batch_size=4, recompute=True,
                       runtime=on_dask)  # fmt: skip
    assert again.drop("query_id").equals(ours.drop("query_id"))


def test_bad_worker_count():
    with pytest.raises(UsageError, match="--workers 0"):
        Runtime(workers=0)


def by_edge(scores):
    return scores.sort("src", "dst", "qkv", nulls_last=False)


@pytest.mark.parametrize("method", ["eap", "eap-ig"])
def test_attribution_on_dask_equals_one_process(copies, dask_cluster, method):
    single, dask, again = (actstore.open(p) for p in copies)
    theirs = by_edge(single.attribute(1, method))
    ours = by_edge(dask.attribute(1, method, runtime=Runtime(scheduler=dask_cluster)))
    assert ours.height == theirs.height == 479  # every edge of the toy graph
    assert ours.select("src", "dst", "qkv").equals(theirs.select("src", "dst", "qkv"))
    largest = float(theirs["score"].abs().max())
    assert largest > 0
    np.testing.assert_allclose(ours["score"], theirs["score"], rtol=0, atol=1e-5 * largest)
    # recorded like any query, whatever the cluster: asked again in one process, read back
    assert by_edge(dask.attribute(1, method)).equals(ours)
    # the same tasks on a cluster of the same size: the same sums, to the bit
    repeat = by_edge(again.attribute(1, method, runtime=Runtime(scheduler=dask_cluster)))
    assert repeat.drop("score_id").equals(ours.drop("score_id"))


def test_faithfulness_on_local_cluster_equals_one_process(copies, tmp_path, dask_cluster):
    single = actstore.open(copies[0])
    sid = int(single.attribute(1, "eap-ig")["score_id"][0])
    # the same score set in fresh copies: only the faithfulness runs differ
    twins = [actstore.open(shutil.copytree(copies[0], tmp_path / n)) for n in ("two", "sched")]
    theirs = single.circuit(sid, faithfulness=0.8).row(0, named=True)
    ours = twins[0].circuit(sid, faithfulness=0.8, runtime=Runtime(workers=2)).row(0, named=True)
    assert ours["top_n"] == theirs["top_n"] and ours["n_edges"] == theirs["n_edges"]
    assert ours["faithfulness"] >= 0.8
    assert ours["faithfulness"] == pytest.approx(theirs["faithfulness"], abs=1e-5)
    for key in ("metric_value", "clean_metric", "corrupted_metric"):
        assert ours[key] == pytest.approx(theirs[key], rel=1e-5)
    from queries.attribution import stored_curve

    curves = stored_curve(single, theirs["circuit_id"]), stored_curve(twins[0], ours["circuit_id"])
    assert curves[0].height >= 4 and curves[0]["top_n"].equals(curves[1]["top_n"])
    np.testing.assert_allclose(curves[1]["faithfulness"], curves[0]["faithfulness"], atol=1e-5)
    # recorded like any query: asked again without workers, the same circuit
    assert twins[0].circuit(sid, faithfulness=0.8)["circuit_id"][0] == ours["circuit_id"]
    # two workers of another cluster: the same sums, to the bit
    on_dask = Runtime(scheduler=dask_cluster)
    other = twins[1].circuit(sid, faithfulness=0.8, runtime=on_dask).row(0, named=True)
    assert other["metric_value"] == ours["metric_value"]


def test_cli_sweeps_take_a_scheduler(copies, dask_cluster):
    from click.testing import CliRunner

    runner = CliRunner()
    store = str(copies[2])
    res = runner.invoke(main, ["attribute", store, "--run", "1", "--method", "eap", "--top", "2",
                               "--format", "csv", "--scheduler", dask_cluster])  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "score_id,run_id,method,src,dst,qkv,score" and len(lines) == 3
    res = runner.invoke(main, ["circuit", store, "--scores", lines[1].split(",")[0], "--edges",
                               "10", "--format", "csv", "--scheduler", dask_cluster])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert res.stdout.splitlines()[0].startswith("circuit_id,score_id,top_n,n_edges,faithfulness")
    for command in (["attribute", store, "--run", "1", "--method", "eap"],
                    ["circuit", store, "--scores", "1", "--edges", "3"]):  # fmt: skip
        bad = runner.invoke(main, [*command, "--workers", "0"])
        assert bad.exit_code == 2 and "--workers 0: need at least 1 worker" in bad.output


def _contexts(client) -> dict[str, int]:
    """Per worker, the identity of the run context it keeps (0: none)."""
    from queries.core import sweep

    def held() -> int:
        return id(next(iter(sweep._contexts.values()))) if sweep._contexts else 0

    return client.run(held)


def test_path_and_intervene_on_dask_equal_one_process(copies, toy_random, dask_cluster):
    """`path` and `intervene` run their prompt batches through the same sweep; every worker
    makes the run's context (model, engine, reader) once and reuses it for the next tasks."""
    from distributed import Client

    single, dask = (actstore.open(p) for p in copies[:2])
    on_dask = Runtime(scheduler=dask_cluster)
    args = (1, "a0.h1,m1", "a2.h0:q,logits")
    theirs = single.path_patch(*args, positions=["S2", "END"])
    ours = dask.path_patch(*args, positions=["S2", "END"], runtime=on_dask)
    assert ours.height == theirs.height == 2 * 2 * 2  # senders × receivers × roles
    keys = ("sender", "receiver", "qkv", "role")
    assert ours.select(keys).equals(theirs.select(keys))
    for column in ("value", "normalized"):
        np.testing.assert_allclose(ours[column], theirs[column], rtol=0, atol=1e-6)
    assert np.abs(theirs["value"].to_numpy()).max() > 0
    with Client(dask_cluster) as client:
        first = _contexts(client)
        kept = {address: ident for address, ident in first.items() if ident}
        assert kept  # the workers that ran tasks hold the run's context
        edit = dict(heads="a1.h2,a3.h0", attend="IO", weight=0.5)
        before = single.intervene(1, **edit)
        after = dask.intervene(1, **edit, runtime=on_dask)
        # the same context object served the second query's tasks: nothing was reloaded
        assert {a: i for a, i in _contexts(client).items() if a in kept} == kept
    assert after.height == before.height == 21  # the run, then its 20 prompts
    assert after["prompt_idx"].equals(before["prompt_idx"])
    for column in ("value_before", "value_after", "accuracy_before", "accuracy_after"):
        np.testing.assert_allclose(after[column], before[column], rtol=0, atol=1e-6)


def test_reduce_on_workers_equals_threads(copies):
    """`reduce --workers 2` means what it means on every verb: a local cluster of 2."""
    from click.testing import CliRunner

    store = actstore.open(copies[2])
    hook = "blocks.0.hook_resid_pre"
    theirs = store.reduce(1, hook, "mean")
    ours = store.reduce(1, hook, "mean", recompute=True, runtime=Runtime(workers=2))
    assert ours.drop("query_id").equals(theirs.drop("query_id"))
    command = ["reduce", str(copies[2]), "--run", "1", "--hook", hook, "--workers", "1",
               "--recompute", "--format", "csv"]  # fmt: skip
    res = CliRunner().invoke(main, command)
    assert res.exit_code == 0, res.output
    assert len(res.stdout.strip().splitlines()) == theirs.height + 1
