"""How long a query's process takes to be ready to compute, against the floor of its imports.

    ACTSTORE_MODEL_CACHE=DIR PYTHONPATH=$PWD python benchmarks/cold_start.py STORE [--run 1]

A query on a store whose model was converted (actstore/model/converted.py) maps the converted
weights instead of loading the model through TransformerLens' bridge. This script times, in
fresh processes taking turns, (a) the floor: `python -c "import torch, zarr, duckdb"`, and (b) a
query's start: importing the CLI and the circuit query, opening the store, reading the run and
loading its model, everything an uncached `actstore circuit` does before its first batch. Each
is the median of `--repeat` processes; (b) also checks that neither transformer_lens nor
transformers was imported. Any store works: `benchmarks/autocircuit/run.sh gpt2` leaves one
at GPT-2-small shape, with its model cache beside it.
"""

from __future__ import annotations

import argparse
import statistics
import subprocess
import sys
import time

FLOOR = "import torch, zarr, duckdb"
START = """
import sys
import actstore.app.cli
import queries.attribution.circuits
from actstore.core.store import Store
from queries.core.run_model import model_for_run
store = Store(sys.argv[1])
model = model_for_run(store.run(int(sys.argv[2])), "cpu")
loaded = sorted({"transformer_lens", "transformers"} & set(sys.modules))
assert not loaded, f"imported {loaded}"
"""


def wall(code: str, *args: str) -> float:
    """Seconds one fresh Python process takes to run `code`."""
    t0 = time.perf_counter()
    subprocess.run([sys.executable, "-c", code, *args], check=True)
    return time.perf_counter() - t0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("store", help="a store whose run's model was converted")
    parser.add_argument("--run", default="1", help="the run whose model to load (default 1)")
    parser.add_argument("--repeat", type=int, default=5, help="processes of each kind (default 5)")
    args = parser.parse_args()
    wall(START, args.store, args.run)  # warm the page cache: the first process reads the files
    floors, starts = [], []
    for _ in range(args.repeat):
        floors.append(wall(FLOOR))
        starts.append(wall(START, args.store, args.run))
    floor, start = statistics.median(floors), statistics.median(starts)
    print(f"floor ({FLOOR}): {floor:.2f} s; query ready to compute: {start:.2f} s; "
          f"difference {start - floor:+.2f} s (medians of {args.repeat}; "
          f"neither transformer_lens nor transformers imported)")  # fmt: skip


if __name__ == "__main__":
    main()
