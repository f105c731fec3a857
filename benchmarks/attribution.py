"""EAP-IG over all edges vs one full forward+backward: wall time ratio and memory.

    PYTHONPATH=. python benchmarks/attribution.py [--model toy-random] [--n 32] [--steps 5]

Ingests an IOI run into a temporary store, times `attribute --method eap-ig` (every edge, S
steps, store reads included) against one forward+backward of the model over the same prompts,
and prints peak RSS (CPU) or peak CUDA memory.
"""

from __future__ import annotations

import resource
import time

import torch
from ioi_store import parser, temporary_ioi_store

from actstore.core.runtime import Runtime
from actstore.core.store import Store
from queries.attribution import attribute


def forward_backward_seconds(store: Store, model_name: str, device: str | None) -> float:
    """One full forward+backward over the run's clean prompts, through the bridge."""
    from actstore.model.adapter import load_model

    adapter = load_model(model_name, device)
    tokens = torch.as_tensor(store.read(1, "clean", "tokens"), dtype=torch.long)
    batch = int(store.run(1)["batch_size"])
    started = time.perf_counter()
    for lo in range(0, tokens.shape[0], batch):
        logits = adapter.hooked_logits(tokens[lo : lo + batch].to(adapter.device))
        logits[:, -1].sum().backward()
    return time.perf_counter() - started


def compute_seconds(store: Store, model_name: str, steps: int, device: str | None) -> float:
    """EAP-IG over every edge with the model already loaded (what a warm session pays)."""
    from actstore.model.adapter import load_model
    from queries.attribution import resolve_params
    from queries.attribution.edge_model import EdgeModel
    from queries.attribution.gradients import compute_scores

    model = EdgeModel(load_model(model_name, device))
    params = resolve_params("eap-ig", steps, None, "logit-diff")
    started = time.perf_counter()
    compute_scores(model, store, store.run(1), params, Runtime(progress=False))
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - started


def main() -> None:
    options = parser(__doc__, model="toy-random", n=32)
    options.add_argument("--steps", type=int, default=5)
    args = options.parse_args()
    with temporary_ioi_store(args, batch_size=16) as store:
        base = forward_backward_seconds(store, args.model, args.device)
        started = time.perf_counter()
        on = Runtime(device=args.device)
        scores = attribute(store, 1, "eap-ig", steps=args.steps, runtime=on)
        end_to_end = time.perf_counter() - started
        eap_ig = compute_seconds(store, args.model, args.steps, args.device)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"model {args.model}, {args.n} IOI prompts, {scores.height} edges, {args.steps} steps")
    print(f"one forward+backward: {base:.3f} s")
    print(f"EAP-IG all edges:     {eap_ig:.3f} s  (ratio {eap_ig / base:.1f}x; store reads "
          "included, model loaded)")  # fmt: skip
    print(f"attribute end to end: {end_to_end:.3f} s  (model load and catalog write included)")
    print(f"peak RSS {rss_mb:.0f} MB", end="")
    if torch.cuda.is_available():
        print(f", peak CUDA {torch.cuda.max_memory_allocated() / 2**20:.0f} MB", end="")
    print()


if __name__ == "__main__":
    main()
