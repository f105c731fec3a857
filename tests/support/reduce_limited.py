"""Run a mean reduction with the address space capped (a helper the tests run as a subprocess).

Usage: python tests/support/reduce_limited.py STORE BIG_RUN SMALL_RUN HOOK BUDGET_BYTES

Warms every code path up on SMALL_RUN (imports, catalog, Dask's thread pool), then caps the
address space at the warmed-up size plus BUDGET_BYTES and reduces BIG_RUN. Prints one JSON line:
baseline and limit bytes, whether torch was imported, and whether loading the whole array with
numpy under the same cap failed (it must, for the cap to mean anything). The means go to
STORE's catalog, where the test reads them.
"""

from __future__ import annotations

import json
import resource
import sys


def vm_size() -> int:
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")


def main() -> None:
    store_path, big, small, hook, budget = sys.argv[1:6]
    import actstore

    store = actstore.open(store_path)
    store.reduce(int(small), hook, "mean")
    baseline = vm_size()
    limit = baseline + int(budget)
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    rows = store.reduce(int(big), hook, "mean")
    try:
        store.read(int(big), "clean", hook).sum()
        numpy_fits = True
    except MemoryError:
        numpy_fits = False
    print(
        json.dumps(
            {"baseline": baseline, "limit": limit, "rows": rows.height,
             "torch": "torch" in sys.modules, "numpy_fits": numpy_fits}
        )
    )  # fmt: skip


if __name__ == "__main__":
    main()
