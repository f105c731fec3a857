"""Path patching and exact edge effects against TransformerLens, side by side in one process.

    PYTHONPATH=$PWD python benchmarks/paths.py      # every shape: sized for ~10 min on 2 idle cores
    PYTHONPATH=$PWD python benchmarks/paths.py --shape toy,gpt2-small --quick

Shapes (`--shape`, comma-separated): the built-in `toy`, and random-weight models of real shapes
built offline (benchmarks/patching.py): `gpt2-small`, `pythia-160m` (parallel attention and MLP,
rotary) and `llama-3.2-1b` (32 query / 8 key-value heads). Each ingests `--prompts` equal-length
IOI prompts (8 by default) into a temporary store; our side reads the cached activations from
it, TL's side gets the clean and corrupted caches (as `get_act_patch_direct_path` takes them).
Per shape it prints, with wall times, speed-up, the FLOP bound (TL's full forwards ÷ the FLOPs
our recompute performs: the speed-up that skipping work alone gives at equal FLOP rates), the
share of that bound reached and the largest |difference| of the metric:

- **q sweep**: one sender (a0.h0) into every later head's q (at Llama-3.2-1B shape the 32 heads
  of the middle layer, 8: TL's every later layer would take half an hour), against TL 4.3's
  `patching.get_act_patch_direct_path` (one full forward per receiver). Where a sweep over
  some layers only is wanted (or TL refuses the model), TL's side is the same forward by hand:
  one forward per receiver with the sender's clean − corrupted output added to that head's
  `hook_q_input` under TL's split q/k/v inputs (what the function does inside).
- **logits**: `--senders all --receivers logits` against one TL forward per sender adding its
  clean − corrupted output to `ln_final.hook_in`.
- **prefix reuse**: the q sweep with the sender restricted to END (`--positions END`), our
  recompute from END only over the base run's cached prefix against our plain full-length
  recompute (`fast=False`).
- **exact edges**: `attribute --method exact`'s every edge against TL's one hooked forward
  per edge; at GPT-2-small shape (32,491 edges, hours for either side) the edges of a few
  evenly spaced source nodes, in seconds per 1,000 edges.

Where TL's side would take minutes (hundreds of forwards of a large model), it is timed on an
evenly spaced sample (`--tl-sample`; each of its forwards costs the same) and scaled to the whole
sweep; the line says so, and max |diff| is over the sample.
"""

from __future__ import annotations

import argparse
import os
import resource
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE), str(HERE.parent / "tests" / "support")]

import numpy as np  # noqa: E402
import torch  # noqa: E402
from edge_reference import data_of, input_hooks, logit_diff, node_outputs  # noqa: E402
from patching import SHAPES, TEMPLATE, builtin_model, shaped_model  # noqa: E402

from actstore.core.roles import positions  # noqa: E402
from actstore.core.store import Store  # noqa: E402
from actstore.model.adapter import ModelAdapter  # noqa: E402
from queries.attribution import Graph  # noqa: E402
from queries.attribution.edge_batches import edge_reader, read_batch  # noqa: E402
from queries.attribution.edge_model import EdgeModel  # noqa: E402
from queries.attribution.exact import exact_scores  # noqa: E402
from queries.core.engine import Engine  # noqa: E402
from queries.core.reader import Reader  # noqa: E402
from queries.paths import check_path  # noqa: E402
from queries.paths.compute import span_sums  # noqa: E402
from queries.paths.spec import recorded_pairs, run_shape  # noqa: E402


@dataclass(frozen=True)
class Setting:
    """What one shape runs: the q sweep's receiver layers (None: every later layer), TL's
    sample sizes (None: every item), whether exact edge effects are timed and on the edges of
    how many sources (None: every edge)."""

    q_layers: tuple[int, ...] | None = None
    tl_q: int | None = None
    tl_logits: int | None = None
    exact: bool = False
    tl_edges: int | None = None
    exact_sources: int | None = None


SETTINGS = {
    "toy": Setting(exact=True, tl_edges=96),
    "gpt2-small": Setting(tl_logits=24, exact=True, tl_edges=24, exact_sources=1),
    "pythia-160m": Setting(tl_logits=24),
    "llama-3.2-1b": Setting(q_layers=(8,), tl_q=8, tl_logits=8),
}
QUICK = {  # --quick: a check that every line runs, in a fraction of the time
    "toy": Setting(exact=True, tl_edges=24),
    "gpt2-small": Setting(
        q_layers=(10,), tl_q=4, tl_logits=4, exact=True, tl_edges=4, exact_sources=1
    ),
    "pythia-160m": Setting(q_layers=(10,), tl_q=4, tl_logits=4),
    "llama-3.2-1b": Setting(q_layers=(14,), tl_q=2, tl_logits=2),
}
HEADER = (f"{'sweep':<46}{'items':>7}{'TL s':>9}{'ours s':>9}{'speed-up':>10}{'FLOP bound':>12}"
          f"{'of bound':>10}{'max |diff|':>12}{'peak MiB':>10}")  # fmt: skip


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def ours(
    store: Store, model: ModelAdapter, senders: str, receivers: str, roles=None, fast=True
) -> tuple[list[tuple[str, str]], np.ndarray, float, float]:
    """(sender, receiver) names, their values (the first role's), seconds and FLOPs of our
    path patching over the stored run (what `compute_paths` runs, on the loaded model)."""
    started = time.perf_counter()
    params = check_path(store, 1, senders, receivers, roles, "logit-diff", "denoise")
    shape = run_shape(store, 1)
    chosen = recorded_pairs(params, shape)
    at = None if roles is None else positions(store, 1, roles)
    e = Engine.from_adapter(model)
    reader = Reader(store, 1, model.device, e)
    sums = sum(span_sums(e, reader, span, chosen, at, "logit-diff", "denoise", fast)
               for span in reader.spans())  # fmt: skip
    names = [(s.name, r.name) for s, r in chosen]
    return names, sums[:, 0] / reader.n, time.perf_counter() - started, e.flops


def sample(n: int, k: int | None) -> np.ndarray:
    """k evenly spaced indices of range(n) (all of them for None)."""
    return np.arange(n) if k is None or k >= n else np.linspace(0, n - 1, k).round().astype(int)


def tl_added(
    model: ModelAdapter, data: dict, items: list[tuple[str, int | None, torch.Tensor]]
) -> tuple[np.ndarray, float]:
    """One TL forward of the corrupted run per (hook, head, Δ), Δ added to that hook's input
    (to one head's split input where head is given): metric values and seconds."""
    started = time.perf_counter()
    out = []
    for hook, head, delta in items:

        def add(act, hook, head=head, delta=delta):
            act = act.clone()
            if head is None:
                act += delta
            else:
                act[:, :, head] += delta
            return act

        with torch.no_grad():
            split = hook != "ln_final.hook_in"  # TL's per-head q/k/v and MLP inputs
            logits = model.hooked_logits(data["corrupted"], [(hook, add)], split)
        out.append(float(logit_diff(logits, data)))
    return np.array(out), time.perf_counter() - started


def line(label: str, n: int, tl_s: float, ours_s: float, bound: float | None, diff: float):
    ratio = tl_s / ours_s
    flops = "—" if bound is None else f"{bound:.2f}x"
    share = "—" if bound is None else f"{ratio / bound:.0%}"
    print(f"{label:<46}{n:>7}{tl_s:>9.2f}{ours_s:>9.2f}{ratio:>9.2f}x{flops:>12}{share:>10}"
          f"{diff:>12.1e}{peak_mib():>10.0f}", flush=True)  # fmt: skip


def bench(name: str, model: ModelAdapter, setting: Setting, n_prompts: int) -> None:
    import transformer_lens.patching as tlp
    from patching_helpers import OneTemplateIOI, ingest_pairs_task

    with tempfile.TemporaryDirectory() as tmp:
        os.environ["ACTSTORE_MODEL_CACHE"] = str(Path(tmp) / "models")  # no copy left behind
        started = time.perf_counter()
        path = ingest_pairs_task(Path(tmp) / "store", model, OneTemplateIOI(TEMPLATE),
                                 n=n_prompts, batch_size=n_prompts)  # fmt: skip
        store, data = Store(path), data_of(Store(path))
        seq = int(data["clean"].shape[1])
        arch, graph = model.architecture, Graph.of(model.architecture)
        forward = Engine.from_adapter(model).forward_flops(n_prompts, seq)
        print(f"\n{name} ({arch.family}, {arch.n_layers} layers, {arch.n_heads} query / "
              f"{arch.n_kv_heads} key-value heads): {n_prompts} prompts x {seq} tokens; ingest "
              f"{time.perf_counter() - started:.1f} s\n{HEADER}", flush=True)  # fmt: skip
        _, clean = model.run_with_cache(data["clean"])
        _, corrupted = model.run_with_cache(data["corrupted"])
        delta = node_outputs(model, data["clean"]) - node_outputs(model, data["corrupted"])

        # one sender into every later head's q
        layers = setting.q_layers
        receivers = "a*.*:q" if layers is None else ",".join(f"a{la}.*:q" for la in layers)
        names, values, ours_s, flops = ours(store, model, "a0.h0", receivers)
        heads = [(int(r[1:].split(".")[0]), int(r.split(".h")[1])) for _, r in names]
        label = f"a0.h0 -> {receivers} (TL direct path)"
        try:
            if layers is not None or setting.tl_q is not None:
                raise NotImplementedError("a sample: TL's function sweeps every later layer")
            with torch.no_grad():
                t0 = time.perf_counter()
                tl = tlp.get_act_patch_direct_path(
                    model.bridge, data["corrupted"], clean, corrupted,
                    lambda logits: logit_diff(logits, data), 0, 0, "q", verbose=False,
                )  # fmt: skip
                tl_s = time.perf_counter() - t0
            want, got = np.array([float(tl[la, h]) for la, h in heads]), values
        except (ValueError, NotImplementedError):  # parallel blocks, or a sample by hand
            pick = sample(len(heads), setting.tl_q)
            f = graph.head_index(0, 0)
            items = [(f"blocks.{heads[i][0]}.hook_q_input", heads[i][1], delta[:, :, f])
                     for i in pick]  # fmt: skip
            want, tl_s = tl_added(model, data, items)
            tl_s *= len(heads) / len(pick)
            got = values[pick]
            timed = "" if len(pick) == len(heads) else f", {len(pick)} timed"
            label = f"a0.h0 -> {receivers} (TL hooks{timed})"
        line(label, len(heads), tl_s, ours_s, len(heads) * forward / flops,
             float(np.abs(got - want).max()))  # fmt: skip

        # every sender's direct effect on the logits
        names, values, ours_s, flops = ours(store, model, "all", "logits")
        pick = sample(len(names), setting.tl_logits)
        senders = [graph.cell_of(names[i][0], "logits", None)[0] for i in pick]
        items = [("ln_final.hook_in", None, delta[:, :, f]) for f in senders]
        want, tl_s = tl_added(model, data, items)
        tl_s *= len(names) / len(pick)
        timed = "" if len(pick) == len(names) else f", {len(pick)} timed"
        line(f"all -> logits (TL hooks{timed})", len(names), tl_s, ours_s,
             len(names) * forward / flops, float(np.abs(values[pick] - want).max()))  # fmt: skip

        # the q sweep restricted to END: the cached prefix reused against the plain recompute
        _, full, full_s, full_flops = ours(store, model, "a0.h0", receivers, ["END"], False)
        _, tail, tail_s, tail_flops = ours(store, model, "a0.h0", receivers, ["END"], True)
        line("  --positions END: tail only (TL: ours, plain)", len(full), full_s, tail_s,
             full_flops / tail_flops, float(np.abs(full - tail).max()))  # fmt: skip

        if setting.exact:
            edge_model = EdgeModel(model)
            reader = edge_reader(store, store.run(1), edge_model)
            batch = read_batch(reader, next(reader.spans()), edge_model)
            k = setting.exact_sources
            sources = None if k is None else np.linspace(0, graph.n_forward, k + 2)[1:-1]
            sources = None if sources is None else sources.astype(int)
            t0 = time.perf_counter()
            scores = exact_scores(edge_model, batch, "logit-diff", n_prompts, sources).numpy()
            ours_s = time.perf_counter() - t0
            rows, cols = graph.edge_cells
            if sources is not None:
                keep = np.isin(rows, sources)
                rows, cols = rows[keep], cols[keep]
            pick = sample(len(rows), setting.tl_edges)
            clean_run = dict(data, corrupted=data["clean"])  # the edge patched in the clean run
            hooks = input_hooks(model)
            items = []
            for f, b in zip(rows[pick], cols[pick], strict=True):
                hook, span = next((n, c) for n, c in hooks if c.start <= b < c.stop)
                head = b - span.start if span.stop - span.start > 1 else None
                items.append((hook, head, -delta[:, :, f]))
            with torch.no_grad():
                clean_m = float(logit_diff(model.hooked_logits(data["clean"]), data))
            values, tl_s = tl_added(model, clean_run, items)
            tl_s *= len(rows) / len(pick)
            got = scores[rows[pick], cols[pick]]
            diff = float(np.abs(got - (values - clean_m)).max())
            timed = "" if len(pick) == len(rows) else f", {len(pick)} timed"
            which = "" if sources is None else f" of sources {','.join(map(str, sources))}"
            line(f"exact edge effects{which} (TL hooks{timed})", len(rows), tl_s, ours_s, None,
                 diff)  # fmt: skip
            print(f"  per 1,000 edges: ours {1000 * ours_s / len(rows):.2f} s, TL one forward "
                  f"per edge {1000 * tl_s / len(rows):.2f} s ({graph.n_edges} edges in all)",
                  flush=True)  # fmt: skip


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="toy,gpt2-small,pythia-160m,llama-3.2-1b",
                        help=f"comma-separated, of toy, {', '.join(SHAPES)}")  # fmt: skip
    parser.add_argument("--prompts", type=int, default=8, help="IOI prompts per shape")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument("--quick", action="store_true", help="a few receivers per shape")
    args = parser.parse_args()
    shapes = args.shape.split(",")
    unknown = [s for s in shapes if s not in SETTINGS]
    if unknown:
        parser.error(f"--shape {','.join(unknown)}: choose of {', '.join(SETTINGS)}")
    torch.set_num_threads(args.threads)
    torch.set_grad_enabled(False)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; load average "
          f"{os.getloadavg()[0]:.1f}")  # fmt: skip
    for name in shapes:
        model = builtin_model(name) if name == "toy" else shaped_model(name)
        bench(name, model, (QUICK if args.quick else SETTINGS)[name], args.prompts)
        del model
    print(f"load average at the end {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()
