"""Scale benchmark: ingest on 1 vs 2 Dask workers, arrays on local disk vs in object storage, and
the peak memory of an out-of-core Dask reduction against the size of the array it reduces.

    PYTHONPATH=. python benchmarks/scale.py --n 512 --batch-size 8

Every ingest is timed end to end as a user runs it (`actstore ingest …` in a fresh process,
imports, cluster start and model loads included). From the chunk ledger's commit times each
ingest is split into its start (process start to the first recorded batch: imports, cluster,
model, prompts), its steady state (first to last recorded batch, reported as prompts/s over the
batches in between) and its finish. The object store is moto's S3 server on 127.0.0.1 (the same
server the tests use): its figures show the overhead of the S3 code path (HTTP round trips per
object), not a real bucket's network.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

PEAK = """
import json, resource, sys
import actstore, dask.array, queries.reduction.reduce
store = actstore.open(sys.argv[1]); hook = sys.argv[2]
store.prompts(1)
base = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
rows = store.reduce(1, hook, "mean")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"baseline": base, "peak": peak, "nbytes": store.array(1, "clean", hook).nbytes,
                  "torch": "torch" in sys.modules}))
"""

# Reads a finished store in a fresh process: verify and a head sweep, each timed.
QUERIES = """
import json, sys, time
import actstore
store = actstore.open(sys.argv[1])
t = time.monotonic(); bad = store.verify(); verify_s = time.monotonic() - t
t = time.monotonic(); store.patch(1, "head", recompute=True); sweep_s = time.monotonic() - t
info = store.info().to_dicts()[0]
print(json.dumps({"verify_s": verify_s, "sweep_s": sweep_s, "problems": bad.height,
                  "stored_bytes": info["stored_bytes"], "raw_bytes": info["raw_bytes"]}))
"""


def _ingest(store: Path, args: argparse.Namespace, extra: list[str]) -> dict:
    """One `actstore ingest` process, timed, and its phases from the ledger's commit times."""
    command = [sys.executable, "-m", "actstore.app.cli", "ingest", str(store),
               "--model", args.model, "--task", "ioi", "--n", str(args.n),
               "--batch-size", str(args.batch_size), "--hooks", args.hooks, *extra]  # fmt: skip
    began = time.time()
    subprocess.run(command, env=ENV, check=True, stdout=subprocess.DEVNULL)
    wall = time.time() - began
    import actstore

    times = (
        actstore.open(store)
        .query("SELECT chunk_idx, epoch(max(written_at)) AS t FROM chunks GROUP BY ALL ORDER BY t")[
            "t"
        ]
        .to_list()
    )
    steady = times[-1] - times[0]
    return {
        "wall": wall,
        "start": times[0] - began,
        "steady_rate": (len(times) - 1) * args.batch_size / steady if steady > 0 else float("nan"),
        "finish": began + wall - times[-1],
    }


def _queries(store: Path) -> dict:
    done = subprocess.run([sys.executable, "-c", QUERIES, str(store)], env=ENV,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"queries on {store} failed: {done.stderr.strip()[-500:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def _row(label: str, columns: list[str]) -> str:
    return f"{label:<38}" + "".join(f"{c:>22}" for c in columns)


def scaling(tmp: Path, args: argparse.Namespace) -> None:
    runs = {
        "one process": [],
        "--workers 1": ["--workers", "1"],
        "--workers 2": ["--workers", "2"],
    }
    got = {name: _ingest(tmp / name.replace(" ", "-"), args, extra) for name, extra in runs.items()}
    print(f"ingest of {args.n} prompts ({args.n // args.batch_size} batches of "
          f"{args.batch_size}), {args.model}, hooks {args.hooks}")  # fmt: skip
    print(_row("", list(runs)))
    print(_row("wall s (end to end)", [f"{g['wall']:.1f}" for g in got.values()]))
    print(_row("  start s (to first batch)", [f"{g['start']:.1f}" for g in got.values()]))
    print(_row("  finish s (after last batch)", [f"{g['finish']:.1f}" for g in got.values()]))
    print(_row("prompts/s end to end", [f"{args.n / g['wall']:.1f}" for g in got.values()]))
    print(_row("prompts/s steady state", [f"{g['steady_rate']:.1f}" for g in got.values()]))
    one, two = got["--workers 1"], got["--workers 2"]
    print(f"--workers 2 / --workers 1 throughput: {one['wall'] / two['wall']:.2f}x end to end, "
          f"{two['steady_rate'] / one['steady_rate']:.2f}x in the steady state")  # fmt: skip


def _sweep(store: Path, extra: list[str]) -> float:
    """One `actstore patch` process computing a head-by-position sweep afresh, timed."""
    command = [sys.executable, "-m", "actstore.app.cli", "patch", str(store), "--run", "1",
               "--component", "head-pos", "--recompute", "--batch-size", "16", *extra]  # fmt: skip
    began = time.time()
    subprocess.run(command, env=ENV, check=True, stdout=subprocess.DEVNULL)
    return time.time() - began


def sweeps(tmp: Path, args: argparse.Namespace) -> None:
    store = tmp / "sweep-store"
    if not store.exists():
        _ingest(store, args, [])
    runs = {"one process": [], "--workers 1": ["--workers", "1"], "--workers 2": ["--workers", "2"]}
    walls = {name: _sweep(store, extra) for name, extra in runs.items()}
    print(f"\nhead-by-position patching sweep over {args.n} prompts (batches of 16), each a fresh "
          "`actstore patch` process")  # fmt: skip
    print(_row("", list(runs)))
    print(_row("wall s (end to end)", [f"{w:.1f}" for w in walls.values()]))
    print(f"--workers 2 / --workers 1: {walls['--workers 1'] / walls['--workers 2']:.2f}x")


def object_store(tmp: Path, args: argparse.Namespace) -> None:
    import boto3
    from moto.server import ThreadedMotoServer

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    ENV.update({"AWS_ENDPOINT_URL": f"http://{host}:{port}", "AWS_ACCESS_KEY_ID": "bench",
                "AWS_SECRET_ACCESS_KEY": "bench", "AWS_DEFAULT_REGION": "us-east-1"})  # fmt: skip
    os.environ.update({k: ENV[k] for k in ENV if k.startswith("AWS_")})
    boto3.client("s3").create_bucket(Bucket="bench")
    local, remote = tmp / "local", tmp / "s3"
    sides = {
        "local disk": (_ingest(local, args, []), _queries(local)),
        "S3 (moto, 127.0.0.1)": (_ingest(remote, args, ["--arrays-url", "s3://bench/acts"]),
                                 _queries(remote)),
    }  # fmt: skip
    print(f"\narrays on local disk vs in object storage ({args.n} prompts, one process)")
    print(_row("", [*sides, "S3 / local"]))
    rows = [
        ("ingest wall s", lambda i, q: i["wall"]),
        ("ingest prompts/s steady state", lambda i, q: i["steady_rate"]),
        ("verify s (every chunk checksummed)", lambda i, q: q["verify_s"]),
        ("head sweep s (patch --component head)", lambda i, q: q["sweep_s"]),
        ("bytes stored", lambda i, q: q["stored_bytes"]),
    ]
    for label, value in rows:
        a, b = (value(*sides[k]) for k in sides)
        print(_row(label, [f"{a:.1f}" if a < 1e5 else f"{a:,}", f"{b:.1f}" if b < 1e5 else f"{b:,}",
                           f"{b / a:.2f}x"]))  # fmt: skip
    raw = sides["local disk"][1]["raw_bytes"]
    print(f"bytes raw (uncompressed): {raw:,}; problems found by verify: "
          f"{[q['problems'] for _, q in sides.values()]}")  # fmt: skip
    server.stop()


REDUCED = "blocks.2.hook_resid_pre"  # a stored array (the default set derives blocks.0's)


def reduction_memory(tmp: Path) -> None:
    store = next(p for p in (tmp / "one-process", tmp / "sweep-store", tmp / "local") if p.exists())
    out = subprocess.run(
        [sys.executable, "-c", PEAK, str(store), REDUCED],
        env={**ENV, "MALLOC_ARENA_MAX": "2"}, capture_output=True, text=True, check=True,
    ).stdout  # fmt: skip
    peak = json.loads(out.strip().splitlines()[-1])
    grew = max(peak["peak"] - peak["baseline"], 0)
    print(f"\ndask mean over {REDUCED}: array {peak['nbytes'] / 2**20:.1f} MiB, "
          f"peak RSS {peak['peak'] / 2**20:.0f} MiB, of which {grew / 2**20:.1f} MiB over "
          f"the baseline after imports ({grew / peak['nbytes']:.2f}x the array); "
          f"torch imported: {peak['torch']}")  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-random")
    parser.add_argument("--n", type=int, default=512)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--hooks", default="default")
    parser.add_argument("--skip", choices=["workers", "sweeps", "s3"], action="append", default=[])
    args = parser.parse_args()
    load = os.getloadavg()[0]
    print(f"load average at start: {load:.1f} on {os.cpu_count()} CPUs"
          + (" (a loaded machine: figures are pessimistic)" if load > 1 else ""))  # fmt: skip
    with tempfile.TemporaryDirectory() as name:
        tmp = Path(name)
        if "workers" not in args.skip:
            scaling(tmp, args)
        if "sweeps" not in args.skip:
            sweeps(tmp, args)
        if "s3" not in args.skip:
            object_store(tmp, args)
        reduction_memory(tmp)
    print(f"load average at end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
