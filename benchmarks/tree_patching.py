"""Exact faithfulness of a circuit curve: tree patching against the dense edge forward.

    PYTHONPATH=. python benchmarks/tree_patching.py [--shape gpt2-small] [--n 16] [--batch-size 16]

Builds a random-weight model of the shape (benchmarks/patching.py) as a Hugging Face directory,
ingests n IOI prompts, scores every edge with EAP, then for the pruned top-K circuits at K = 0,
10, 50, 100, 500, 1000, 5000, 10000 and all, on the same prompt batches (read once, model
loaded), times side by side the dense forward (`EdgeModel.run` with `dropped`, what every
circuit ran before) and tree patching (`TreePatcher.logits`), with the largest logit difference
between them and how many nodes each circuit computes; then the nine circuits side by side along
the batch axis (`TreePatcher.logits_many`, in groups as `evaluate.GROUP_BYTES` allows) against
one by one; then the whole curve through `circuit(edges=[...])`, one call. The load average is
printed before and after: on a loaded machine only the ratio means something.
"""

from __future__ import annotations

import os
import resource
import tempfile
import time
from pathlib import Path

import torch
from patching import shaped_hf

from actstore.core.runtime import Runtime
from actstore.core.store import Store
from actstore.model.adapter import load_model
from ingest.runner import ingest
from queries.attribution import attribute, circuit, score_graph, top_edges
from queries.attribution.edge_batches import edge_reader, read_batch
from queries.attribution.edge_model import EdgeModel
from queries.attribution.evaluate import GROUP_BYTES
from queries.attribution.tree import COMPUTED, TreePatcher

SIZES = (0, 10, 50, 100, 500, 1000, 5000, 10000)


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--shape", default="gpt2-small")
    p.add_argument("--n", type=int, default=16)
    p.add_argument("--batch-size", type=int, default=16)
    args = p.parse_args()
    torch.set_grad_enabled(False)
    print(f"load average {os.getloadavg()[0]:.1f} at the start")
    with tempfile.TemporaryDirectory() as tmp:
        directory = Path(tmp) / "model"
        hf, tok = shaped_hf(args.shape)
        hf.save_pretrained(directory)
        tok.save_pretrained(directory)
        del hf
        store = Store(Path(tmp) / "store", create=True)
        ingest(store, model=str(directory), task="ioi", n=args.n, batch_size=args.batch_size,
               runtime=Runtime(progress=False))  # fmt: skip
        sid = int(attribute(store, 1, "eap")["score_id"][0])
        _, graph, values = score_graph(store, sid)
        sizes = [k for k in SIZES if k < graph.n_edges] + [graph.n_edges]
        masks = {k: top_edges(graph, values, k, prune=True) for k in sizes}
        model = EdgeModel(load_model(str(directory)))
        patcher = TreePatcher(model)
        dense_s = dict.fromkeys(sizes, 0.0)
        tree_s = dict.fromkeys(sizes, 0.0)
        worst = together_worst = together_s = 0.0
        groups = []
        reader = edge_reader(store, store.run(1), model)
        for batch in (read_batch(reader, span, model) for span in reader.spans()):
            tree = patcher.batch(batch.clean, batch.corrupted, batch.last)
            tree_logits = {}
            for k, kept in masks.items():
                dropped = torch.as_tensor(graph.real & ~kept, dtype=torch.float32)
                started = time.perf_counter()
                dense = model.run(batch.clean[:, :, 0], batch.last, batch.corrupted, dropped)
                dense_s[k] += time.perf_counter() - started
                started = time.perf_counter()
                fast = patcher.logits(tree, kept)
                tree_s[k] += time.perf_counter() - started
                worst = max(worst, float((fast - dense.logits).abs().max()))
                tree_logits[k] = fast
            group = max(1, GROUP_BYTES // (2 * tree.delta_clean.nbytes))
            groups.append(group)
            started = time.perf_counter()
            together = []
            for at in range(0, len(sizes), group):
                together += patcher.logits_many(tree, [masks[k] for k in sizes[at : at + group]])
            together_s += time.perf_counter() - started
            for k, logits in zip(sizes, together, strict=True):
                together_worst = max(together_worst, float((logits - tree_logits[k]).abs().max()))
        print(f"{args.shape} shape, {graph.n_edges} edges, {args.n} IOI prompts in batches of "
              f"{args.batch_size}; each circuit's forwards over every batch:")  # fmt: skip
        print(f"{'top K':>7} {'computed nodes':>15} {'dense s':>9} {'tree s':>9} {'ratio':>7}")
        for k in sizes:
            computed = int((patcher.statuses(masks[k]) == COMPUTED).sum())
            print(f"{k:>7} {computed:>15} {dense_s[k]:>9.3f} {tree_s[k]:>9.3f} "
                  f"{dense_s[k] / max(tree_s[k], 1e-9):>6.1f}x")  # fmt: skip
        total_dense, total_tree = sum(dense_s.values()), sum(tree_s.values())
        print(
            f"{'all':>7} {'':>15} {total_dense:>9.3f} {total_tree:>9.3f} "
            f"{total_dense / total_tree:>6.1f}x   largest logit difference {worst:.2e}"
        )
        print(
            f"side by side along the batch axis ({groups} circuits per forward): "
            f"{together_s:.3f} s vs one by one {total_tree:.3f} s: "
            f"{total_tree / together_s:.2f}x; largest logit difference {together_worst:.2e}"
        )
        started = time.perf_counter()
        curve = circuit(store, sid, edges=sizes)
        one_call = time.perf_counter() - started
        print(
            f"circuit(edges=[{len(sizes)} sizes]) in one call: {one_call:.2f} s "
            "(model load, store reads and catalog write included)"
        )
        print(
            "faithfulness:",
            " ".join(
                f"{k}:{f:.4f}" for k, f in zip(curve["top_n"], curve["faithfulness"], strict=True)
            ),
        )
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"peak RSS {rss:.0f} MB; load average {os.getloadavg()[0]:.1f} at the end")


if __name__ == "__main__":
    main()
