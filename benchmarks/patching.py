"""Our patching sweeps vs TransformerLens' side by side, in one process, same prompts.

    PYTHONPATH=$PWD python benchmarks/patching.py            # toy + GPT-2-small shape, ~5 min
    PYTHONPATH=$PWD python benchmarks/patching.py --quick    # fewer patches, ~1-2 min

Both models ingest 8 equal-length IOI prompts (one template, 16 tokens with BOS) into a store in
a temporary directory; our sweep reads the cached activations from it, TL's sweep runs
`transformer_lens.patching` on the same tokens with the clean cache. For each sweep it prints:
the wall time of both, the measured speed-up, the FLOP-count bound (TL's full forwards ÷ the
FLOPs our downstream, suffix-only, metric-only recompute really did), the measured speed-up as
a fraction of that bound, the largest |difference| of the patched metric, the share of our
time spent verifying the chunks it read against the ledger (checksums of the decoded values
and the ledger lookup), and the process's peak resident memory so far. By-position sweeps run
over a sample of positions (both sides the same) to keep TL's one-forward-per-patch cost inside
the time budget.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import resource
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from actstore.models import BUILTIN_DIR, ModelAdapter, adapter_from_hf, load_model  # noqa: E402
from actstore.store import Store  # noqa: E402
from queries.core import metrics  # noqa: E402
from queries.core.engine import Engine  # noqa: E402
from queries.patching import check_spec, compute_effects  # noqa: E402

TEMPLATE = 3  # "While A and B were working at the PLACE , C gave a OBJECT to": 16 tokens
N_PROMPTS = 8
TL = {
    "head": ("get_act_patch_attn_head_out_all_pos", ("layer", "head_index")),
    "head-pos": ("get_act_patch_attn_head_out_by_pos", ("layer", "pos", "head_index")),
    "resid": ("get_act_patch_resid_pre", ("layer", "pos")),
}


def gpt2_small_shape() -> ModelAdapter:
    """GPT-2 small's shape with random weights and a 50,257-token word-level vocabulary (the IOI
    task's words plus made-up ones), so that it runs offline."""
    from transformers import GPT2Config, GPT2LMHeadModel

    from actstore.tokenizer import SPECIAL_TOKENS, read_vocab, word_level_tokenizer

    words = [w for w in read_vocab(BUILTIN_DIR / "toy" / "vocab.json") if w not in SPECIAL_TOKENS]
    n_words = 50257 - len(SPECIAL_TOKENS)
    words += [f"w{i}" for i in range(n_words - len(words))]
    tok = word_level_tokenizer(words, name="gpt2-small-shape")
    torch.manual_seed(0)
    shape = {"n_layer": 12, "n_embd": 768, "n_head": 12, "n_inner": 3072, "vocab_size": 50257}
    config = GPT2Config(**shape, n_positions=1024, bos_token_id=0, eos_token_id=0, pad_token_id=1)
    hf = GPT2LMHeadModel(config).eval()
    return adapter_from_hf("gpt2-small-shape", hf, tok, "cpu")


def toy_model() -> ModelAdapter:
    weights = BUILTIN_DIR / "toy" / "model.safetensors"
    return load_model("toy" if weights.exists() else "toy-random", "cpu")


class VerifyClock:
    """Seconds spent checking reads against the chunk ledger (checksums, ledger lookups)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        import actstore.arrays

        for owner, name in ((actstore.arrays, "checksum"), (Store, "ledger")):
            setattr(owner, name, self._timed(getattr(owner, name)))

    def _timed(self, fn):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds += time.perf_counter() - started

        return timed


def peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def tl_sweep(model: ModelAdapter, store: Store, component: str, direction: str, positions):
    """TL's patching over the same patches; returns (seconds, values in our row order, n)."""
    import pandas as pd

    pr = store.prompts(1)
    tokens = {s: torch.tensor(store.read(1, s, "tokens")).long() for s in ("clean", "corrupted")}
    targets = metrics.Targets(
        torch.tensor(pr["answer_token"].to_numpy()).long(),
        torch.tensor(pr["wrong_answer_token"].to_numpy()).long(),
        torch.tensor(store.read(1, "clean", "logits")),
    )
    fn = metrics.logits_metric_fn("logit-diff", torch.tensor(pr["seq_len"].to_numpy() - 1), targets)
    src, base = ("clean", "corrupted") if direction == "denoise" else ("corrupted", "clean")
    s = model.shape
    name, axes = TL[component]
    rows = []
    for layer in range(s.n_layers):
        if component == "head":
            rows += [(layer, h) for h in range(s.n_heads)]
        elif component == "head-pos":
            rows += [(layer, p, h) for p in positions for h in range(s.n_heads)]
        else:
            rows += [(layer, p) for p in positions]
    index = pd.DataFrame(rows, columns=list(axes))
    started = time.perf_counter()
    with torch.inference_mode(), contextlib.redirect_stderr(io.StringIO()):
        _, cache = model.run_with_cache(tokens[src])
        values = model.hooked_patching(
            name, tokens[base], cache, fn, index_axis_names=None, index_df=index
        )
    seconds = time.perf_counter() - started

    def ours(row: tuple) -> tuple:  # our rows sort by (layer, head, pos)
        named = dict(zip(axes, row, strict=True))
        return named["layer"], named.get("head_index", -1), named.get("pos", -1)

    order = sorted(range(len(rows)), key=lambda i: ours(rows[i]))
    return seconds, values.numpy()[order], len(rows)


def bench(label: str, model: ModelAdapter, sweeps: list[tuple[str, list[int] | None]]) -> None:
    from patching_helpers import OneTemplateIOI, ingest_pairs_task

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        path = ingest_pairs_task(Path(tmp) / "store", model, OneTemplateIOI(TEMPLATE),
                                 n=N_PROMPTS, batch_size=N_PROMPTS)  # fmt: skip
        store = Store(path)
        seq = int(store.run(1)["seq_len"])
        print(f"\n{label}: {model.shape}; {N_PROMPTS} prompts x {seq} tokens; "
              f"ingest {time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
        print(f"{'sweep':<22}{'patches':>8}{'TL s':>9}{'ours s':>9}{'speed-up':>10}"
              f"{'FLOP bound':>12}{'of bound':>10}{'max |diff|':>12}{'verify':>8}"
              f"{'peak MiB':>10}")  # fmt: skip
        forward = Engine.from_adapter(model).forward_flops(N_PROMPTS, seq)
        for component, positions in sweeps:
            spec = check_spec(store, 1, component, "logit-diff", "denoise", 1, positions)
            store = Store(path)  # a fresh store: its ledger lookups count
            VERIFY.seconds = 0.0
            started = time.perf_counter()
            ours, flops = compute_effects(store, 1, spec, model, batch_size=N_PROMPTS,
                                          progress=False)  # fmt: skip
            t_ours = time.perf_counter() - started
            verify = VERIFY.seconds / t_ours
            t_tl, tl_values, n = tl_sweep(model, store, component, "denoise", positions)
            diff = float(np.abs(ours["value"].to_numpy() - tl_values).max())
            ratio, bound = t_tl / t_ours, n * forward / flops
            where = "" if positions is None else f" @{len(positions)} pos"
            print(f"{component + where:<22}{n:>8}{t_tl:>9.2f}{t_ours:>9.2f}{ratio:>9.2f}x"
                  f"{bound:>11.2f}x{ratio / bound:>9.0%}{diff:>12.1e}{verify:>8.1%}"
                  f"{peak_mib():>10.0f}", flush=True)  # fmt: skip


VERIFY = VerifyClock()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer patches (~1-2 min)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs visible")  # fmt: skip
    all_pos = list(range(16))
    toy = toy_model()
    bench(toy.spec, toy, [("head", None), ("head-pos", [4, 11]), ("resid", all_pos)])
    gpt2 = gpt2_small_shape()
    if args.quick:
        bench("gpt2-small-shape", gpt2, [("head-pos", [8]), ("resid", [0, 8])])
    else:
        bench("gpt2-small-shape", gpt2, [("head", None), ("head-pos", [4, 11]),
                                         ("resid", all_pos)])  # fmt: skip


if __name__ == "__main__":
    main()
