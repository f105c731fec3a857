"""Shared fixtures: offline Hugging Face, and small stores ingested once per session."""

from __future__ import annotations

import itertools
import os
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # `make test` and `make check` run one pytest-xdist worker per core: torch in each worker,
    # and in the processes its tests start, keeps to one thread rather than all the cores.
    os.environ["OMP_NUM_THREADS"] = os.environ["MKL_NUM_THREADS"] = "1"

import pytest  # noqa: E402


@pytest.hookimpl(tryfirst=True, optionalhook=True)
def pytest_xdist_make_scheduler(config, log):
    """Under `--dist loadfile`, a worker takes a whole test file at a time, so that module
    fixtures are built once; the tests named test_demo* (test_demo.py and the report's browser
    test) go together, so that the session's demo is built once."""
    if config.getvalue("dist") != "loadfile":
        return None
    from xdist.scheduler import LoadScopeScheduling

    class ByFile(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            path, _, name = nodeid.partition("::")
            return "test_demo" if name.startswith("test_demo") else path

    return ByFile(config, log)


def _combinations(item, strength: int) -> set[tuple]:
    params = sorted((name, repr(value)) for name, value in item.callspec.params.items())
    return set(itertools.combinations(params, min(strength, len(params))))


def cover(items: list) -> None:
    """Mark slow all but a covering subset of each test marked `cover(n)`: every n values of
    different parameters appear together in at least one quick test (n=1: every value once),
    chosen greedily, the same on every pytest-xdist worker; `make test` runs the whole matrix."""
    groups: dict = {}
    for item in items:
        if item.get_closest_marker("cover") and not item.get_closest_marker("slow"):
            groups.setdefault((item.path, item.originalname), []).append(item)
    for group in groups.values():
        strength = group[0].get_closest_marker("cover").args[0]
        combos = {id(item): _combinations(item, strength) for item in group}
        left = set().union(*combos.values())
        keep = set()
        while left:
            best = max(group, key=lambda item: len(combos[id(item)] & left))
            keep.add(id(best))
            left -= combos[id(best)]
        for item in group:
            if id(item) not in keep:
                item.add_marker(pytest.mark.slow)


def pytest_collection_modifyitems(config, items):
    """The covering subsets of parameter matrices (`cover`). On a pytest-xdist worker, the files
    that hold slow tests go first (the workers take files in this order), so that no long file
    starts last while the other worker idles."""
    cover(items)
    if os.environ.get("PYTEST_XDIST_WORKER"):
        slow = {item.path for item in items if item.get_closest_marker("slow")}
        items.sort(key=lambda item: item.path not in slow)  # stable: file order otherwise


@pytest.fixture(scope="session", autouse=True)
def model_cache(tmp_path_factory) -> Path:
    """Converted models (actstore/model/converted.py) go to the test run's temporary directory,
    never the user's cache; processes the tests start inherit it."""
    path = tmp_path_factory.mktemp("model-cache")
    os.environ["ACTSTORE_MODEL_CACHE"] = str(path)
    return path


@pytest.fixture(scope="session")
def toy_random():
    """The toy architecture with seeded random weights."""
    from actstore.model.adapter import load_model

    return load_model("toy-random")


def built_once(tmp_path_factory, name: str, build) -> Path:
    """`build(path)` run once for the whole test run, however many pytest-xdist workers: the
    first worker to ask builds under a file lock in the run's common temporary directory, and
    every worker gets its own copy (no two processes share a catalog file or writer lock)."""
    import fcntl
    import shutil

    base = tmp_path_factory.getbasetemp()
    common = base.parent if os.environ.get("PYTEST_XDIST_WORKER") else base
    built, done = common / f"built-{name}" / "store", common / f"built-{name}.done"
    with open(common / f"built-{name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not done.exists():
            shutil.rmtree(built.parent, ignore_errors=True)  # a build that failed part way
            build(built)
            done.touch()
    return Path(shutil.copytree(built, tmp_path_factory.mktemp(name) / "store"))


@pytest.fixture(scope="session")
def ioi_store(tmp_path_factory):
    """A store with one complete IOI run (run 1) on toy-random: 20 prompts, batches of 8."""
    from actstore.core.store import Store
    from ingest.runner import ingest

    def build(path: Path) -> None:
        ingest(Store(path, create=True), model="toy-random", task="ioi", n=20, batch_size=8)

    return built_once(tmp_path_factory, "ioi", build)


@pytest.fixture(autouse=True)
def _session_store_unchanged(request):
    """Fails the test that writes to the shared `ioi_store` (it needs `ioi_copy`): a later test
    on the same worker would otherwise find rows it did not write. Every catalog transaction
    ends in a checkpoint into the file, so its bytes tell (reading them opens no connection)."""
    if "ioi_store" not in request.fixturenames:
        yield
        return
    import hashlib

    catalog = request.getfixturevalue("ioi_store") / "catalog.duckdb"
    before = hashlib.sha256(catalog.read_bytes()).digest()
    yield
    after = hashlib.sha256(catalog.read_bytes()).digest()
    assert after == before, f"{request.node.nodeid} wrote to ioi_store: use ioi_copy"


@pytest.fixture
def ioi_copy(ioi_store, tmp_path):
    """A test's own copy of `ioi_store`, for a test that records queries or changes the store:
    the session's store stays as ingested whichever tests ran before on the same worker."""
    import shutil

    return shutil.copytree(ioi_store, tmp_path / "store")


@pytest.fixture
def empty_store(tmp_path):
    """A store with a catalog and no runs: enough for SQL and output checks, built without a
    model (well under a second)."""
    from actstore.core.store import Store

    store = Store(tmp_path / "s", create=True)
    with store.writer():  # its first writer makes it
        pass
    return store.path


@pytest.fixture(scope="session")
def hand_store(tmp_path_factory):
    """A store of hand-built result rows (tests/support/handbuilt.py): (path, ids by name).
    Read only."""
    import handbuilt

    path = tmp_path_factory.mktemp("hand") / "store"
    return path, handbuilt.build(path)


@pytest.fixture
def session_ingest(monkeypatch, toy_random):
    """Ingests in this process load `toy-random` as the session's copy (no reload per test)."""
    import ingest.runner

    real = ingest.runner.load_model

    def load(spec, device=None, source=None):
        return toy_random if spec == "toy-random" else real(spec, device, source)

    monkeypatch.setattr(ingest.runner, "load_model", load)


@pytest.fixture(scope="session")
def demo_run(tmp_path_factory):
    """`actstore demo` on two IOI samples (8 prompts each), run once for the session:
    (directory, printed summary, returned head overlap, seconds). Tests may add queries to its
    store, never runs."""
    import io
    import time

    from actstore.app import demo as demo_module

    directory = tmp_path_factory.mktemp("demo") / "d"
    out = io.StringIO()
    started = time.monotonic()
    df = demo_module.demo(directory, tasks=["ioi", "ioi"], n=8, top_k=4, out=out)
    return directory, out.getvalue(), df, time.monotonic() - started


@pytest.fixture(scope="session")
def forker_process():
    """One helper process (tests/support/ingest_forker.py) for the session's kill, shard and
    coordinator tests: it imports torch and loads `toy-random` once, then forks a real ingest
    (or `actstore` command) per request, so that none of them pays for that import again."""
    from ingest_forker import Forker

    f = Forker()
    yield f
    f.close()


@pytest.fixture
def forker(forker_process):
    """The session's forker, settled after each test (a failed test's child never answers the
    next test's requests)."""
    yield forker_process
    forker_process.settle()


@pytest.fixture(scope="session")
def s3_server():
    """A local S3-compatible server (moto's server mode) on 127.0.0.1 at a free port, with an
    empty bucket `acts`; the standard AWS variables point this process, its subprocesses and
    Dask workers started after it at the server. Yields those variables."""
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    env = {
        "AWS_ENDPOINT_URL": f"http://{host}:{port}",
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
    }
    before = {key: os.environ.get(key) for key in env}
    os.environ.update(env)
    boto3.client("s3").create_bucket(Bucket="acts")
    yield env
    for key, value in before.items():
        if value is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = value
    server.stop()


@pytest.fixture(scope="session")
def dask_cluster(s3_server):
    """One LocalCluster of 2 single-threaded worker processes for the session; yields the
    scheduler's address. The workers fork from actstore.core.cluster's forkserver, which has
    imported torch and TransformerLens once (a spawned worker imports them afresh, seconds of CPU
    each), and get the S3 server's variables through the nanny (a forkserver started before the
    S3 server would not pass them on)."""
    import dask
    import distributed  # noqa: F401  (loads its config first: setting a key would hide it)

    from actstore.core.cluster import local_cluster, start_forkserver
    from ingest.distributed import WORKER_MODULES as INGEST
    from queries.core.sweep import WORKER_MODULES as QUERIES

    start_forkserver([*INGEST, *QUERIES])  # a no-op where a `--workers` test started it first
    with dask.config.set({"distributed.nanny.environ": s3_server}):
        cluster = local_cluster(2)
    with cluster:
        yield cluster.scheduler_address
