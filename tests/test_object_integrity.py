"""Arrays are never overwritten by another store or a store that lost its catalog, and an object
store that misbehaves fails in bounded time with one line."""

from __future__ import annotations

import socket
import threading
import time

import pytest
from click.testing import CliRunner
from test_cli import snapshot
from test_metadata import one_line

from actstore.app.cli import main
from actstore.core.errors import ActstoreError, UsageError
from actstore.core.store import Store

PARAMS = {"task": "ioi", "n": 8, "batch_size": 4}
INGEST = ["--model", "toy-random", "--task", "ioi", "--n", "4"]


def test_an_ingest_beside_arrays_whose_catalog_is_gone_is_refused(ioi_copy):
    """The catalog deleted, the arrays still there: a new run 1 would overwrite run 1's arrays."""
    (ioi_copy / "catalog.duckdb").unlink()
    before = snapshot(ioi_copy)
    res = CliRunner().invoke(main, ["ingest", str(ioi_copy), *INGEST])
    one_line(res, 1, "has no catalog.duckdb, but", "holds the arrays of run1",
             "restore catalog.duckdb from a backup")  # fmt: skip
    assert snapshot(ioi_copy) == before


@pytest.fixture
def silent_server():
    """A TCP server on 127.0.0.1 that accepts connections and never answers; yields its URL."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except TimeoutError:
                continue
            except OSError:
                return

    thread = threading.Thread(target=accept, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.getsockname()[1]}"
    stop.set()
    thread.join(5)
    for conn in held:
        conn.close()
    server.close()


def test_an_endpoint_that_never_answers_fails_in_bounded_time(tmp_path, monkeypatch, silent_server):
    monkeypatch.setenv("AWS_ENDPOINT_URL", silent_server)
    for key, value in [("AWS_ACCESS_KEY_ID", "x"), ("AWS_SECRET_ACCESS_KEY", "x"),
                       ("AWS_DEFAULT_REGION", "us-east-1"), ("ACTSTORE_S3_READ_TIMEOUT", "1"),
                       ("ACTSTORE_S3_ATTEMPTS", "2")]:  # fmt: skip
        monkeypatch.setenv(key, value)
    started = time.monotonic()
    res = CliRunner().invoke(main, ["ingest", str(tmp_path / "s"), *INGEST,
                                    "--arrays-url", "s3://acts/x"])  # fmt: skip
    elapsed = time.monotonic() - started
    one_line(res, 1, "did not answer within 1 s (2 attempts)", "ACTSTORE_S3_READ_TIMEOUT")
    assert elapsed < 20, elapsed
    assert not (tmp_path / "s").exists()


@pytest.mark.parametrize(
    ("env", "url", "message"),
    [
        ({"AWS_ENDPOINT_URL": "127.0.0.1:9000"}, "s3://acts/x",
         "AWS_ENDPOINT_URL=127.0.0.1:9000: give a URL with its scheme"),
        ({}, "s3://Bad_Bucket!/x", "'Bad_Bucket!' is not a valid bucket name"),
        ({"ACTSTORE_S3_READ_TIMEOUT": "soon"}, "s3://acts/x",
         "ACTSTORE_S3_READ_TIMEOUT=soon: give a positive number of seconds"),
    ],
)  # fmt: skip
def test_malformed_object_store_settings_are_one_line(tmp_path, monkeypatch, env, url, message):
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    res = CliRunner().invoke(main, ["ingest", str(tmp_path / "s"), *INGEST, "--arrays-url", url])
    one_line(res, 2, message)
    assert not (tmp_path / "s").exists()


@pytest.mark.slow
def test_two_stores_never_share_an_arrays_prefix(tmp_path, toy_random, s3_server):
    """The first store claims its prefix with a marker object; a second store given the same
    prefix is refused before anything is written, and the first still verifies."""
    import actstore
    from ingest.runner import ingest

    first, second = tmp_path / "first", tmp_path / "second"
    store = Store(first, create=True)
    ingest(store, model=toy_random, arrays_url="s3://acts/shared", **PARAMS)
    with pytest.raises(UsageError, match=f"holds the arrays of another store .{first} on "):
        ingest(Store(second, create=True), model=toy_random, arrays_url="s3://acts/shared/",
               **PARAMS)  # fmt: skip
    assert not second.exists()
    assert actstore.open(first).verify().is_empty()
    again = ingest(store, model=toy_random, arrays_url="s3://acts/shared", **PARAMS)
    assert again["outcome"].item() == "existing"  # the owner itself is let in

    (first / "catalog.duckdb").unlink()
    with pytest.raises(ActstoreError, match="s3://acts/shared holds the arrays of run1"):
        ingest(Store(first, create=True), model=toy_random, **PARAMS)


def free_port() -> int:
    probe = socket.socket()
    probe.bind(("127.0.0.1", 0))
    port = probe.getsockname()[1]
    probe.close()
    return port


@pytest.mark.slow
@pytest.mark.parametrize("data", ["kept", "lost", "lost-repair"])
def test_an_s3_server_restarted_mid_ingest_leaves_a_run_a_rerun_completes(
    tmp_path, tmp_path_factory, toy_random, s3_server, monkeypatch, data
):
    """The server stops while the third batch is written and comes back: with its data kept,
    rerunning the failed ingest resumes it; with its data lost (the prefix emptied), rerunning
    with --restart redoes it, or rerunning plainly completes it with its first batches missing,
    which `verify` names and `verify --repair` recomputes. Every way the run ends complete,
    verifies, and equals an uninterrupted ingest."""
    import s3fs
    from moto.server import ThreadedMotoServer
    from same_store import assert_same_store, single_process_store

    import actstore
    import ingest.runner
    from actstore.core.object_store import object_store_error
    from ingest.runner import ingest as run_ingest

    params = {**PARAMS, "n": 16}
    port = free_port()  # a server of its own, sharing the session server's in-process data
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("ACTSTORE_S3_ATTEMPTS", "1")
    real, calls = ingest.runner.write_chunks, []

    def stopping(*args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            server.stop()
        return real(*args, **kwargs)

    monkeypatch.setattr(ingest.runner, "write_chunks", stopping)
    store = tmp_path / "store"
    with pytest.raises(Exception) as failed:  # the CLI words it with object_store_error
        run_ingest(Store(store, create=True), model=toy_random,
                   arrays_url=f"s3://acts/restarted-{data}", **params)  # fmt: skip
    assert "cannot reach the object store" in str(object_store_error(failed.value))
    monkeypatch.setattr(ingest.runner, "write_chunks", real)
    kept = actstore.open(store).runs().to_dicts()[0]
    assert kept["status"] in ("failed", "ingesting"), kept
    again = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    again.start()
    try:
        if data.startswith("lost"):
            s3fs.S3FileSystem(endpoint_url=f"http://127.0.0.1:{port}").rm(
                f"acts/restarted-{data}", recursive=True
            )
        row = run_ingest(Store(store), model=toy_random, restart=data == "lost", **params)
        outcome = "restarted" if data == "lost" else "resumed"
        assert row["outcome"].item() == outcome and row["status"].item() == "complete"
        if data == "lost-repair":
            import ingest.repair

            missing = actstore.open(store).verify()
            assert set(missing["problem"]) == {"missing"} and missing.height > 10, missing
            monkeypatch.setattr(ingest.repair, "load_model", lambda spec, device=None: toy_random)
            repaired = actstore.open(store).repair()
            assert "repaired" in repaired["result"].to_list(), repaired
        assert actstore.open(store).verify().is_empty()
        marker = f"acts/restarted-{data}/actstore-store.json"  # written again when lost
        assert s3fs.S3FileSystem(endpoint_url=f"http://127.0.0.1:{port}").exists(marker)
        reference = single_process_store(tmp_path_factory, toy_random, "restart-ref", **params)
        assert_same_store(store, reference)
    finally:
        again.stop()
