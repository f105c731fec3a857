"""Path patching and exact edge effects against TransformerLens, side by side in one process.

    PYTHONPATH=$PWD python benchmarks/paths.py                         # toy and GPT-2-small shape
    PYTHONPATH=$PWD python benchmarks/paths.py --models toy --exact-edges 479

Each model ingests `--prompts` equal-length IOI prompts (8 by default) into a temporary store
(the models of benchmarks/patching.py: built-in toys and random-weight real shapes). Then:
- one sender (a0.h0) into every later head's q: ours (`queries.paths.compute_paths`, variants
  along the batch axis from the receiver's layer) against TL 4.3's
  `patching.get_act_patch_direct_path` (one full forward per receiver); wall times, speed-up,
  the largest |difference| of the metric;
- `--senders all --receivers logits` against the same TL hooks (one forward per sender adding
  its clean − corrupted output to `ln_final.hook_in`);
- exact edge effects: our seconds per 1,000 edges (`--method exact` over every edge) against TL's
  one hooked forward per edge, timed on `--exact-edges` edges (all of them on the toy).
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "support")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from edge_reference import hooked_edge_effects, logit_diff, node_outputs  # noqa: E402
from patching import TEMPLATE, builtin_model, shaped_model  # noqa: E402

from actstore.core.store import Store  # noqa: E402
from queries.attribution import Graph  # noqa: E402
from queries.attribution.edge_batches import edge_reader, read_batch  # noqa: E402
from queries.attribution.edge_model import EdgeModel  # noqa: E402
from queries.attribution.exact import exact_scores  # noqa: E402
from queries.paths import check_path, compute_paths  # noqa: E402


def data_of(store: Store) -> dict:
    prompts = store.prompts(1)

    def ids(column: str) -> torch.Tensor:
        return torch.as_tensor(prompts[column].to_numpy().copy(), dtype=torch.long)

    data = {side: torch.as_tensor(store.read(1, side, "tokens"), dtype=torch.long)
            for side in ("clean", "corrupted")}  # fmt: skip
    data.update(last=ids("seq_len") - 1, answer=ids("answer_token"),
                wrong=ids("wrong_answer_token"))  # fmt: skip
    return data


def timed(fn):
    started = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - started


def bench(label: str, model, n_prompts: int, exact_edges: int) -> None:
    import transformer_lens.patching as tlp
    from patching_helpers import OneTemplateIOI, ingest_pairs_task

    with tempfile.TemporaryDirectory() as tmp:
        path = ingest_pairs_task(Path(tmp) / "store", model, OneTemplateIOI(TEMPLATE),
                                 n=n_prompts, batch_size=n_prompts)  # fmt: skip
        store, data = Store(path), data_of(Store(path))
        graph = Graph.of(model.architecture)
        print(f"\n{label}: {model.shape}; {n_prompts} prompts", flush=True)
        _, clean = model.run_with_cache(data["clean"])
        _, corrupted = model.run_with_cache(data["corrupted"])

        params = check_path(store, 1, "a0.h0", "a*.*:q", None, "logit-diff", "denoise")
        ours, ours_s = timed(lambda: compute_paths(store, 1, params))
        with torch.no_grad():
            tl, tl_s = timed(lambda: tlp.get_act_patch_direct_path(
                model.bridge, data["corrupted"], clean, corrupted,
                lambda logits: logit_diff(logits, data), 0, 0, "q", verbose=False))  # fmt: skip
        want = np.array([float(tl[int(r[1:].split(".")[0]), int(r.split(".h")[1])])
                         for r in ours["receiver"]])  # fmt: skip
        diff = np.abs(ours["value"].to_numpy() - want).max()
        print(
            f"a0.h0 -> every later q ({ours.height} receivers): TL {tl_s:.2f} s, ours "
            f"{ours_s:.2f} s, speed-up {tl_s / ours_s:.1f}x, max |diff| {diff:.2e}",
            flush=True,
        )

        params = check_path(store, 1, "all", "logits", None, "logit-diff", "denoise")
        ours, ours_s = timed(lambda: compute_paths(store, 1, params))
        swapped = dict(data, clean=data["corrupted"], corrupted=data["clean"])
        cells = [graph.cell_of(s, "logits", None) for s in ours["sender"]]
        ref, tl_s = timed(lambda: hooked_edge_effects(model, swapped, cells))
        with torch.no_grad():
            base = float(logit_diff(model.hooked_logits(data["corrupted"]), data))
        diff = np.abs(ours["value"].to_numpy() - base - np.array([ref[c] for c in cells])).max()
        print(
            f"all -> logits ({ours.height} senders): TL hooks {tl_s:.2f} s, ours {ours_s:.2f} s, "
            f"speed-up {tl_s / ours_s:.1f}x, max |diff| {diff:.2e}",
            flush=True,
        )

        edge_model = EdgeModel(model)
        reader = edge_reader(store, store.run(1), edge_model)
        batch = read_batch(reader, next(reader.spans()), edge_model)
        _, ours_s = timed(lambda: exact_scores(edge_model, batch, "logit-diff", n_prompts))
        rows, cols = graph.edge_cells
        pick = np.linspace(0, len(rows) - 1, min(exact_edges, len(rows))).astype(int)
        node_outputs(model, data["clean"])  # warm
        _, tl_s = timed(
            lambda: hooked_edge_effects(model, data, list(zip(rows[pick], cols[pick], strict=True)))
        )
        per_k = 1000 / graph.n_edges * ours_s
        tl_per_k = 1000 / len(pick) * tl_s
        print(
            f"exact edge effects ({graph.n_edges} edges): ours {ours_s:.2f} s in all, "
            f"{per_k:.2f} s per 1,000 edges; TL one forward per edge {tl_per_k:.2f} s per "
            f"1,000 edges (timed on {len(pick)}): speed-up {tl_per_k / per_k:.1f}x",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="toy,gpt2-small")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--exact-edges", type=int, default=200)
    args = parser.parse_args()
    torch.set_grad_enabled(False)
    for name in args.models.split(","):
        model = builtin_model(name) if name.startswith("toy") else shaped_model(name)
        bench(name, model, args.prompts, args.exact_edges)


if __name__ == "__main__":
    main()
