"""Arrays in object storage, against a real S3-compatible server (moto) on 127.0.0.1: ingest,
`--workers 2` ingest, sharded ingest and merge, verify with one damaged object, repair, patch and
export all give what the same commands give on a local store."""

from __future__ import annotations

import subprocess
from pathlib import Path

import polars as pl
import pytest
from cli_process import run_cli
from same_store import assert_same_store, single_process_store

import actstore
from actstore.core.errors import DamagedError
from actstore.core.location import RECORD
from actstore.core.runtime import Runtime
from actstore.core.store import Store

# An S3 server and Dask workers: the whole suite runs these, `make check` does not.
pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]
PARAMS = {"task": "ioi", "n": 12, "batch_size": 4}


@pytest.fixture(scope="module")
def local_store(tmp_path_factory, toy_random) -> Path:
    return single_process_store(tmp_path_factory, toy_random, "local", **PARAMS)


@pytest.fixture(scope="module")
def s3_store(tmp_path_factory, toy_random, s3_server) -> Path:
    from ingest.runner import ingest

    path = tmp_path_factory.mktemp("s3") / "store"
    row = ingest(Store(path, create=True), model=toy_random, arrays_url="s3://acts/main/", **PARAMS)
    assert row["outcome"].item() == "new"
    return path


def _objects(prefix: str) -> list[str]:
    import s3fs

    return sorted(s3fs.S3FileSystem().find(prefix, refresh=True))


def test_ingest_to_object_storage_equals_the_local_store(s3_store, local_store, toy_random):
    files = sorted(p.name for p in s3_store.iterdir())
    assert files == ["arrays-location.json", "catalog.duckdb", "writer.lock"]
    assert "s3://acts/main" in (s3_store / RECORD).read_text()
    keys = _objects("acts/main/run1")
    assert any(k.endswith("/clean/tokens/c/2/0") for k in keys), keys[:5]
    assert_same_store(s3_store, local_store)
    info = actstore.open(s3_store).info().to_dicts()[0]
    assert info["stored_bytes"] > 0 and info["ratio"] > 1

    # rerunning is idempotent; --arrays-url may be repeated, a different one is refused
    from actstore.core.errors import UsageError
    from ingest.runner import ingest

    store = Store(s3_store)
    again = ingest(store, model=toy_random, arrays_url="s3://acts/main", **PARAMS)
    assert again["outcome"].item() == "existing"
    with pytest.raises(UsageError, match="keeps its arrays at s3://acts/main"):
        ingest(store, model=toy_random, arrays_url="s3://acts/other", **PARAMS)


def test_workers_and_shards_into_object_storage(tmp_path, toy_random, local_store, dask_cluster):
    from ingest.runner import ingest
    from ingest.shards import merge

    workers = tmp_path / "workers"
    row = ingest(Store(workers, create=True), model=toy_random, arrays_url="s3://acts/workers",
                 runtime=Runtime(scheduler=dask_cluster), **PARAMS)  # fmt: skip
    assert row["status"].item() == "complete"
    assert_same_store(workers, local_store)

    sharded = tmp_path / "sharded"
    for i in range(2):
        ingest(Store(sharded, create=True), model=toy_random, arrays_url="s3://acts/shards",
               shard=f"{i}/2", **PARAMS)  # fmt: skip
    staged = f"acts/shards/staged/{actstore.open(workers).runs()['params_hash'].item()}/"
    assert any(k.startswith(staged) for k in _objects("acts/shards"))
    assert merge(Store(sharded, create=True))["status"].to_list() == ["complete"]
    assert not any(k.startswith(staged) for k in _objects("acts/shards"))
    assert_same_store(sharded, local_store)


def test_verify_repair_patch_and_export_on_object_storage(
    s3_store, local_store, toy_random, monkeypatch, tmp_path
):
    import s3fs

    import ingest.repair

    monkeypatch.setattr(ingest.repair, "load_model", lambda spec, device=None: toy_random)
    store = actstore.open(s3_store)
    fs = s3fs.S3FileSystem()
    key = "acts/main/run1/clean/blocks.1.attn.hook_z/c/1/0/0/0"
    assert fs.exists(key), _objects("acts/main/run1/clean/blocks.1.attn.hook_z")
    good = fs.cat(key)
    fs.pipe(key, good[:-7] + bytes(7))  # one altered object
    findings = store.verify()
    assert findings.select("hook", "chunk_idx", "problem").rows() == [
        ("blocks.1.attn.hook_z", 1, "damaged")
    ]
    with pytest.raises(DamagedError, match="chunk 1 .* is damaged"):
        store.read(1, "clean", "blocks.1.attn.hook_z")
    repaired = store.repair()
    assert repaired.filter(pl.col("result") == "repaired").height == 1
    assert fs.cat(key) == good and store.verify().is_empty()

    ours = store.patch(1, "head", model=toy_random).sort("layer", "head", "pos")
    theirs = actstore.open(local_store).patch(1, "head", model=toy_random)
    theirs = theirs.sort("layer", "head", "pos")
    assert ours.drop("query_id").equals(theirs.drop("query_id"))

    exported = {}
    for name, path in (("s3", s3_store), ("local", local_store)):
        exported[name] = tmp_path / f"{name}.csv"
        actstore.open(path).export(table="effects", fmt="csv", out=str(exported[name]))
    assert exported["s3"].read_text() == exported["local"].read_text()
    assert len(exported["s3"].read_text().splitlines()) == ours.height + 1


def _cli(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return run_cli(*args, env=env, timeout=300)


@pytest.mark.parametrize(
    "case, env, code, message",
    [
        ("no bucket", {}, 2, "bucket missing-bucket does not exist"),
        ("no credentials", {"AWS_ACCESS_KEY_ID": "", "AWS_SECRET_ACCESS_KEY": "",
                            "AWS_SHARED_CREDENTIALS_FILE": "/nonexistent",
                            "AWS_CONFIG_FILE": "/nonexistent"}, 1, "no credentials"),
        ("unreachable", {"AWS_ENDPOINT_URL": "http://127.0.0.1:9"}, 1,
         "cannot reach the object store"),
    ],
)  # fmt: skip
def test_object_store_errors_are_one_line(tmp_path, s3_server, case, env, code, message):
    bucket = "missing-bucket" if case == "no bucket" else "acts"
    store = tmp_path / "store"
    res = _cli("ingest", str(store), "--model", "toy-random", "--task", "ioi", "--n", "4",
               "--arrays-url", f"s3://{bucket}/x", env=env)  # fmt: skip
    assert res.returncode == code, res.stderr
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("error: "), res.stderr
    assert message in res.stderr
    assert not store.exists()  # refused before the store was touched


@pytest.fixture
def s3_requests(monkeypatch) -> list[str]:
    """The key of every request the S3 client makes from here on (metadata, existence, bytes)."""
    import s3fs

    requests: list[str] = []
    for name in ("_cat_file", "_exists", "_info", "_cat_ranges", "_ls"):
        real = getattr(s3fs.S3FileSystem, name)

        async def counted(self, path, *args, _real=real, **kwargs):
            requests.append(str(path))
            return await _real(self, path, *args, **kwargs)

        monkeypatch.setattr(s3fs.S3FileSystem, name, counted)
    return requests


def test_a_query_reads_each_arrays_metadata_once(s3_store, toy_random, s3_requests):
    """The reader opens each (side, hook) array once per query, not once per span: counted at
    the S3 client, the array's zarr.json is requested by one open however many spans are read,
    then per chunk its existence and its bytes (each chunk still checked against the ledger)."""
    from actstore.core.store import Store
    from queries.core.engine import Engine
    from queries.core.reader import Reader

    store = Store(s3_store)
    reader = Reader(store, 1, "cpu", Engine.from_adapter(toy_random))
    spans = list(reader.spans())
    s3_requests.clear()
    for span in spans:
        reader.tensor("clean", "blocks.0.attn.hook_z", span)
    opened = [key for key in s3_requests if key.endswith("hook_z/zarr.json")]
    chunks = [key for key in s3_requests if "hook_z/c/" in key]
    assert len(spans) == 3 and len(opened) == 2, s3_requests  # one open (its check and its read)
    assert len(chunks) == 2 * len(spans), s3_requests  # per chunk: exists, then its bytes


def test_a_patch_query_opens_each_array_once(s3_store, toy_random, s3_requests, tmp_path):
    """A whole `patch` query over three prompt batches, counted at the S3 client: every (side,
    hook) array it reads has its zarr.json requested by one open (its check and its read), not
    once per batch, while its chunks are read batch by batch, each once (its existence, then its
    bytes), on the side a derivation reads too."""
    import shutil
    from collections import Counter

    copy = shutil.copytree(s3_store, tmp_path / "store")  # its catalog; the arrays stay in S3
    s3_requests.clear()
    # recompute: an earlier test may have recorded this very query in the shared store
    actstore.open(copy).patch(1, "head", batch_size=4, model=toy_random, recompute=True)
    opens = Counter(key.rsplit("/", 1)[0] for key in s3_requests if key.endswith("/zarr.json"))
    chunks = Counter(key.split("/c/")[0] for key in s3_requests if "/c/" in key)
    arrays = [a for a in opens if a.rsplit("/", 1)[1] not in ("run1", "clean", "corrupted")]
    assert arrays and set(chunks) <= set(opens), (opens, chunks)
    assert all(opens[a] <= 2 for a in arrays), opens
    assert set(chunks.values()) == {2 * 3}, chunks  # each of the 3 batches' chunks once
