"""actstore in one process through its Python API (run with the checkout's .venv python): the
same ingest, EAP attribution and top-K curve as the CLI phases, so that its phases compare with
AutoCircuit's one process.

Usage: python actstore_api.py STORE MODEL DATASET BATCH_SIZE K1,K2,…[,all] OUT.json
"""

import time

T0 = time.perf_counter()
import json  # noqa: E402
import os  # noqa: E402
import shutil  # noqa: E402
import sys  # noqa: E402

import actstore  # noqa: E402
from actstore.core.runtime import Runtime  # noqa: E402

store_path, model, dataset, batch, ks_arg, out = sys.argv[1:7]
phases = {"import": time.perf_counter() - T0}
shutil.rmtree(store_path, ignore_errors=True)
t = time.perf_counter()
s = actstore.open(store_path, create=True)
cpu = Runtime(device="cpu", progress=False)
run = s.ingest(model=model, dataset=dataset, batch_size=int(batch), runtime=cpu)
phases["ingest"] = time.perf_counter() - t
run_id = int(run["run_id"][0])
t = time.perf_counter()
scores = s.attribute(run_id, "eap", runtime=cpu)
phases["attribute_eap"] = time.perf_counter() - t
score_id = int(scores["score_id"][0])
t = time.perf_counter()
sizes = [k if k == "all" else int(k) for k in ks_arg.split(",")]
curve = s.circuit(score_id, edges=sizes, prune=False, runtime=cpu)
phases["circuits"] = time.perf_counter() - t
phases["total"] = time.perf_counter() - T0
rows = curve.to_dicts()
json.dump(
    {"phases_s": phases, "circuits": rows, "score_id": score_id, "n_edges": scores.height,
     "load_avg": os.getloadavg()},
    open(out, "w"), indent=1, default=str,
)  # fmt: skip
print(json.dumps(phases, indent=1))
