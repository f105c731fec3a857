"""One calling convention: every verb that computes (ingest, repair, the queries) takes one
Runtime (device, progress, workers, scheduler), the API's verbs have explicit signatures named as
the CLI's options, and `--workers`/`--scheduler` are checked the same way on every verb, before
any model loads."""

from __future__ import annotations

import inspect
import socket

import pytest
from click.testing import CliRunner

import actstore
from actstore.app.api import ActStore
from actstore.app.cli import main
from actstore.core.errors import UsageError
from actstore.core.runtime import Runtime
from queries.core.sweep import in_order

# The verbs whose prompt batches run as Dask tasks, and enough of each to reach the model.
SWEEPS = {
    "patch": ["--component", "head"],
    "attribute": ["--method", "eap"],
    "path": ["--senders", "a0.h1", "--receivers", "logits"],
    "intervene": ["--heads", "a1.h2", "--attend", "IO"],
    "reduce": ["--hook", "blocks.1.hook_resid_mid"],
}


@pytest.mark.parametrize("name", sorted(n for n in dir(ActStore) if not n.startswith("_")))
def test_api_verbs_have_explicit_signatures(name):
    member = getattr(ActStore, name)
    if not inspect.isfunction(member):
        return
    kinds = {p.kind for p in inspect.signature(member).parameters.values()}
    assert inspect.Parameter.VAR_KEYWORD not in kinds, f"ActStore.{name} forwards **kwargs"


def test_runtime_refuses_bad_values_when_made():
    assert Runtime() == Runtime(None, None, None, None)
    with pytest.raises(UsageError, match="--workers 0: need at least 1 worker"):
        Runtime(workers=0)
    with pytest.raises(UsageError, match="give HOST:PORT"):
        Runtime(scheduler="tcp://nowhere")
    with pytest.raises(UsageError, match="now a Dask scheduler's address on every verb"):
        Runtime(scheduler="distributed")
    assert Runtime(workers=2).distributed and Runtime(scheduler="h:8786").distributed
    assert not Runtime(device="cpu").distributed


def test_in_process_verbs_refuse_workers(ioi_copy):
    store = actstore.open(ioi_copy)
    with pytest.raises(UsageError, match="attention runs in this process"):
        store.attention(1, runtime=Runtime(workers=2))
    with pytest.raises(UsageError, match="heads runs in this process"):
        store.heads(1, runtime=Runtime(scheduler="127.0.0.1:1"))
    with pytest.raises(UsageError, match="repair runs in this process"):
        store.repair(runtime=Runtime(workers=2))


def test_ingest_and_repair_are_the_ingest_stages_own_functions():
    """One signature and one set of defaults: the API binds them, as it binds the queries."""
    from ingest.repair import repair
    from ingest.runner import ingest
    from ingest.shards import merge

    assert (ActStore.ingest, ActStore.repair, ActStore.merge) == (ingest, repair, merge)


def test_local_sweep_reports_each_batch_as_it_finishes():
    ticks: list[int] = []
    seen: list[int] = []

    def local(item: int) -> int:
        seen.append(item)
        return item * 10

    parts = in_order(None, local, local, [1, 2, 3], done=lambda: ticks.append(len(seen)))
    assert list(parts) == [10, 20, 30]
    assert ticks == [1, 2, 3]  # a tick per batch, as each finished


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.parametrize("command", sorted(SWEEPS))
def test_bad_scheduler_is_refused_before_the_model_loads(ioi_copy, monkeypatch, command):
    import queries.core.run_model as run_model

    def no_model(*args, **kwargs):
        raise AssertionError("the model loaded before the scheduler was checked")

    monkeypatch.setattr(run_model, "_load", no_model)
    monkeypatch.setattr(run_model, "model_for_run", no_model)
    base = [command, str(ioi_copy), "--run", "1", *SWEEPS[command]]
    runner = CliRunner()
    nobody = runner.invoke(main, [*base, "--scheduler", f"tcp://127.0.0.1:{_closed_port()}"])
    assert nobody.exit_code == 1, nobody.output
    assert "no Dask scheduler answers there" in nobody.output
    assert len(nobody.output.strip().splitlines()) == 1
    malformed = runner.invoke(main, [*base, "--scheduler", "tcp://head"])
    assert malformed.exit_code == 2 and "give HOST:PORT" in malformed.output
    bad = runner.invoke(main, [*base, "--workers", "0"])
    assert bad.exit_code == 2 and "--workers 0: need at least 1 worker" in bad.output


def test_reduce_refuses_its_old_scheduler_spelling(ioi_copy):
    base = ["reduce", str(ioi_copy), "--run", "1", "--hook", "blocks.0.hook_resid_pre"]
    runner = CliRunner()
    old = runner.invoke(main, [*base, "--scheduler", "threads"])
    assert old.exit_code == 2 and "leave it out to run in this process" in old.output
    address = runner.invoke(main, [*base, "--scheduler", "distributed", "--address", "h:8786"])
    assert address.exit_code == 2
    assert "give the scheduler as --scheduler h:8786" in address.output
    assert "--scheduler ADDRESS" in runner.invoke(main, ["reduce", "--help"]).output


def test_a_worker_keeps_one_run_context_per_location_run_and_device(ioi_store, monkeypatch):
    """A sweep's tasks on one worker share its run context: the model loads and the run opens
    on the first task of a (location, run, device), and a task of another key replaces it (one
    model in memory)."""
    from queries.core import run_model, sweep

    loads = []
    real = run_model.model_for_run

    def counted(run, device, *args, **kwargs):
        loads.append(device)
        return real(run, device, *args, **kwargs)

    monkeypatch.setattr(run_model, "model_for_run", counted)
    monkeypatch.setattr(sweep, "_contexts", {})
    first = sweep.run_context(str(ioi_store), 1, "cpu")
    assert sweep.run_context(str(ioi_store), 1, "cpu") is first and loads == ["cpu"]
    assert first.reader.store is first.store and first.engine is first.reader.engine
    other = sweep.run_context(str(ioi_store), 1, None)
    assert other is not first and loads == ["cpu", None]
    assert list(sweep._contexts) == [(str(ioi_store), 1, None)]
