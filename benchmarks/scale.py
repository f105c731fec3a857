"""Scale benchmark: sharded ingest throughput (1 vs 2 shard processes) and the peak memory of an
out-of-core Dask reduction against the size of the array it reduces.

    PYTHONPATH=. python benchmarks/scale.py --n 1024 --model toy-random

Each ingest is timed end to end as real processes (`actstore ingest --shard i/N` in parallel,
then `actstore merge`), imports included, as a user would run them. The reduction runs in a
fresh process that reports its peak resident memory (ru_maxrss) over its warmed-up baseline.
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
import actstore, dask.array, queries.analysis.reduce
store = actstore.open(sys.argv[1]); hook = sys.argv[2]
store.prompts(1)
base = next(int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmRSS"))
rows = store.reduce(1, hook, "mean")
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"baseline": base, "peak": peak, "nbytes": store.array(1, "clean", hook).nbytes,
                  "torch": "torch" in sys.modules}))
"""


def _ingest(store: Path, args: argparse.Namespace, shards: int) -> float:
    common = ["--model", args.model, "--task", "ioi", "--n", str(args.n),
              "--batch-size", str(args.batch_size), "--hooks", args.hooks]  # fmt: skip
    started = time.monotonic()
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "-m",
                "actstore.cli",
                "ingest",
                str(store),
                *common,
                "--shard",
                f"{i}/{shards}",
            ],
            env=ENV,
            stdout=subprocess.DEVNULL,
        )  # fmt: skip
        for i in range(shards)
    ]
    if any(p.wait() != 0 for p in procs):
        raise SystemExit("a shard failed")
    subprocess.run([sys.executable, "-m", "actstore.cli", "merge", str(store)], env=ENV,
                   check=True, stdout=subprocess.DEVNULL)  # fmt: skip
    return time.monotonic() - started


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="toy-random")
    parser.add_argument("--n", type=int, default=1024)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--hooks", default="resid_pre,z,mlp_post")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as tmp:
        walls = {}
        for shards in (1, 2):
            walls[shards] = _ingest(Path(tmp) / f"s{shards}", args, shards)
            print(f"ingest {args.n} prompts, {shards} shard process(es) + merge: "
                  f"{walls[shards]:.1f} s, {args.n / walls[shards]:.1f} prompts/s")  # fmt: skip
        print(f"throughput ratio 2 shards / 1 shard: {walls[1] / walls[2]:.2f}x "
              f"on {os.cpu_count()} CPU(s)")  # fmt: skip
        out = subprocess.run(
            [sys.executable, "-c", PEAK, str(Path(tmp) / "s2"), "blocks.0.mlp.hook_post"],
            env={**ENV, "MALLOC_ARENA_MAX": "2"}, capture_output=True, text=True, check=True,
        ).stdout  # fmt: skip
        peak = json.loads(out.strip().splitlines()[-1])
        grew = max(peak["peak"] - peak["baseline"], 0)
        print(f"dask mean over blocks.0.mlp.hook_post: array {peak['nbytes'] / 2**20:.1f} MiB, "
              f"peak RSS {peak['peak'] / 2**20:.0f} MiB, of which {grew / 2**20:.1f} MiB over "
              f"the baseline after imports ({grew / peak['nbytes']:.2f}x the array); "
              f"torch imported: {peak['torch']}")  # fmt: skip


if __name__ == "__main__":
    main()
