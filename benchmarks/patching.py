"""Our patching sweeps vs TransformerLens' side by side, in one process, same prompts.

    PYTHONPATH=$PWD python benchmarks/patching.py            # toy + GPT-2-small shape, ~5 min
    PYTHONPATH=$PWD python benchmarks/patching.py --quick    # fewer patches, ~1-2 min
    PYTHONPATH=$PWD python benchmarks/patching.py --models pythia-160m,llama-3.2-1b --prompts 2 \
        --sweeps head-pos,resid --positions 11 --resid-positions 4,11

Models (`--models`, comma-separated): the built-in `toy` and `toy-llama`, and random-weight
models of real shapes with word-level vocabularies of their real size, built offline:
`gpt2-small` (12 x 768), `pythia-160m` (GPT-NeoX: 12 x 768, rotary on a quarter of each head,
parallel attention and MLP, vocabulary 50,304) and `llama-3.2-1b` (16 x 2048, 32 query / 8
key-value heads, SwiGLU 8192, Llama 3 rope scaling, tied embeddings, vocabulary 128,256).

Every model ingests `--prompts` equal-length IOI prompts (one template, 16 tokens with BOS; 8 by
default) into a store in a temporary directory; our sweep reads the cached activations from it,
TL's sweep runs `transformer_lens.patching` on the same tokens with the clean cache. For each
sweep it prints: the wall time of both, the measured speed-up, the FLOP-count bound (TL's full
forwards ÷ the FLOPs our downstream, suffix-only, metric-only recompute really did), the
measured speed-up as a fraction of that bound, the largest |difference| of the patched metric,
the share of our time spent verifying the chunks it read against the ledger (checksums of the
decoded values and the ledger lookup), and the process's peak resident memory so far. By-position
sweeps run over a sample of positions, and `--head-layers` restricts the head sweeps to some
layers (both sides the same patches; the FLOP bound counts only those), to keep TL's
one-forward-per-patch cost inside the time budget.
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
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "support"))

import numpy as np  # noqa: E402
import torch  # noqa: E402
from patching_helpers import hooked_patching, logits_metric_fn  # noqa: E402

from actstore.core.runtime import Runtime  # noqa: E402
from actstore.core.store import Store  # noqa: E402
from actstore.model.adapter import ModelAdapter, adapter_from_hf, load_model  # noqa: E402
from actstore.model.model_spec import BUILTIN_DIR  # noqa: E402
from queries.core.engine import Engine  # noqa: E402
from queries.core.reader import Reader, Span  # noqa: E402
from queries.patching import check_spec, compute_effects  # noqa: E402

TEMPLATE = 3  # "While A and B were working at the PLACE , C gave a OBJECT to": 16 tokens
N_PROMPTS = 8
TL = {
    "head": ("get_act_patch_attn_head_out_all_pos", ("layer", "head_index")),
    "head-pos": ("get_act_patch_attn_head_out_by_pos", ("layer", "pos", "head_index")),
    "resid": ("get_act_patch_resid_pre", ("layer", "pos")),
}


SPECIAL = {"bos_token_id": 0, "eos_token_id": 0, "pad_token_id": 1}
SHAPES = {  # Hugging Face configs of real models' shapes (random weights)
    "gpt2-small": {"model_type": "gpt2", "n_layer": 12, "n_embd": 768, "n_head": 12,
                   "n_inner": 3072, "vocab_size": 50257, "n_positions": 1024},
    "pythia-160m": {"model_type": "gpt_neox", "num_hidden_layers": 12, "hidden_size": 768,
                    "num_attention_heads": 12, "intermediate_size": 3072, "vocab_size": 50304,
                    "rotary_pct": 0.25, "use_parallel_residual": True,
                    "max_position_embeddings": 2048, "tie_word_embeddings": False},
    "llama-3.2-1b": {"model_type": "llama", "num_hidden_layers": 16, "hidden_size": 2048,
                     "num_attention_heads": 32, "num_key_value_heads": 8, "head_dim": 64,
                     "intermediate_size": 8192, "vocab_size": 128256,
                     "max_position_embeddings": 131072, "rms_norm_eps": 1e-5,
                     "tie_word_embeddings": True,
                     "rope_parameters": {"rope_type": "llama3", "rope_theta": 500000.0,
                                         "factor": 32.0, "low_freq_factor": 1.0,
                                         "high_freq_factor": 4.0,
                                         "original_max_position_embeddings": 8192}},
}  # fmt: skip
BUILTINS = ("toy", "toy-llama")


def shaped_model(name: str) -> ModelAdapter:
    """`name`'s shape with random weights and a word-level vocabulary of its real size (the IOI
    task's words plus made-up ones), so that it runs offline."""
    hf, tok = shaped_hf(name)
    return adapter_from_hf(f"{name}-shape", hf, tok, "cpu")


def shaped_hf(name: str):
    """(Hugging Face model, tokenizer) of `shaped_model`, e.g. to save as a directory."""
    from transformers import AutoConfig, AutoModelForCausalLM

    from actstore.model.tokenizer import SPECIAL_TOKENS, read_vocab, word_level_tokenizer

    settings = dict(SHAPES[name], **SPECIAL)
    words = [w for w in read_vocab(BUILTIN_DIR / "toy" / "vocab.json") if w not in SPECIAL_TOKENS]
    n_words = settings["vocab_size"] - len(SPECIAL_TOKENS)
    words += [f"w{i}" for i in range(n_words - len(words))]
    tok = word_level_tokenizer(words, name=f"{name}-shape")
    torch.manual_seed(0)
    config = AutoConfig.for_model(settings.pop("model_type"), **settings)
    return AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval(), tok


def builtin_model(name: str) -> ModelAdapter:
    weights = BUILTIN_DIR / name / "model.safetensors"
    return load_model(name if weights.exists() else f"{name}-random", "cpu")


class VerifyClock:
    """Seconds spent checking reads against the chunk ledger (checksums, ledger lookups)."""

    def __init__(self) -> None:
        self.seconds = 0.0
        import actstore.core.arrays

        for owner, name in ((actstore.core.arrays, "checksum"), (Store, "ledger")):
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


def tl_sweep(
    model: ModelAdapter, store: Store, component: str, direction: str, positions, layers
) -> tuple[float, np.ndarray, int]:
    """TL's patching over the same patches (those layers, those positions), through its
    index_df; returns (seconds, values in our row order, n)."""
    import pandas as pd

    reader = Reader(store, 1, "cpu", Engine.from_adapter(model))  # a lean run derives logits
    everyone = Span(0, reader.n)
    tokens = {s: torch.tensor(store.read(1, s, "tokens")).long() for s in ("clean", "corrupted")}
    targets = reader.targets(everyone)
    fn = logits_metric_fn("logit-diff", reader.finals(everyone), targets)
    src, base = ("clean", "corrupted") if direction == "denoise" else ("corrupted", "clean")
    s = model.shape
    name, axes = TL[component]
    rows = []
    for layer in range(s.n_layers) if layers is None else layers:
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
        values = hooked_patching(
            model, name, tokens[base], cache, fn, index_axis_names=None, index_df=index
        )
    seconds = time.perf_counter() - started

    def ours(row: tuple) -> tuple:  # our rows sort by (layer, head, pos)
        named = dict(zip(axes, row, strict=True))
        return named["layer"], named.get("head_index", -1), named.get("pos", -1)

    order = sorted(range(len(rows)), key=lambda i: ours(rows[i]))
    return seconds, values.numpy()[order], len(rows)


def bench(
    label: str,
    model: ModelAdapter,
    sweeps: list[tuple[str, list[int] | None]],
    n_prompts: int,
    head_layers: list[int] | None = None,
) -> None:
    from patching_helpers import OneTemplateIOI, ingest_pairs_task

    with tempfile.TemporaryDirectory() as tmp:
        started = time.perf_counter()
        path = ingest_pairs_task(Path(tmp) / "store", model, OneTemplateIOI(TEMPLATE),
                                 n=n_prompts, batch_size=n_prompts)  # fmt: skip
        store = Store(path)
        seq = int(store.run(1)["seq_len"])
        arch = model.architecture
        print(f"\n{label} ({arch.family}, {arch.n_heads} query / {arch.n_kv_heads} key-value "
              f"heads): {model.shape}; {n_prompts} prompts x {seq} tokens; "
              f"ingest {time.perf_counter() - started:.1f} s", flush=True)  # fmt: skip
        print(f"{'sweep':<22}{'patches':>8}{'TL s':>9}{'ours s':>9}{'speed-up':>10}"
              f"{'FLOP bound':>12}{'of bound':>10}{'max |diff|':>12}{'verify':>8}"
              f"{'peak MiB':>10}")  # fmt: skip
        forward = Engine.from_adapter(model).forward_flops(n_prompts, seq)
        for component, positions in sweeps:
            layers = head_layers if component.startswith("head") else None
            spec = check_spec(store, 1, component, "logit-diff", "denoise", 1, positions, layers)
            store = Store(path)  # a fresh store: its ledger lookups count
            VERIFY.seconds = 0.0
            started = time.perf_counter()
            ours, flops = compute_effects(store, 1, spec, model, batch_size=n_prompts,
                                          runtime=Runtime(progress=False))  # fmt: skip
            t_ours = time.perf_counter() - started
            verify = VERIFY.seconds / t_ours
            t_tl, tl_values, n = tl_sweep(model, store, component, "denoise", positions, layers)
            diff = float(np.abs(ours["value"].to_numpy() - tl_values).max())
            ratio, bound = t_tl / t_ours, n * forward / flops
            where = "" if positions is None else f" @{len(positions)} pos"
            where += "" if layers is None else f" L{','.join(map(str, layers))}"
            print(f"{component + where:<22}{n:>8}{t_tl:>9.2f}{t_ours:>9.2f}{ratio:>9.2f}x"
                  f"{bound:>11.2f}x{ratio / bound:>9.0%}{diff:>12.1e}{verify:>8.1%}"
                  f"{peak_mib():>10.0f}", flush=True)  # fmt: skip


VERIFY = VerifyClock()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer patches (~1-2 min)")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    parser.add_argument(
        "--models",
        default="toy,gpt2-small",
        help=f"comma-separated, of {', '.join([*BUILTINS, *SHAPES])}",
    )
    parser.add_argument("--prompts", type=int, default=N_PROMPTS, help="IOI prompts per model")
    parser.add_argument(
        "--sweeps", default="head,head-pos,resid", help="comma-separated, of head, head-pos, resid"
    )
    parser.add_argument("--positions", default="4,11", help="head-pos positions (of 0..15)")
    parser.add_argument(
        "--resid-positions", default="all", help="resid positions (of 0..15), or all"
    )
    parser.add_argument(
        "--head-layers",
        default="all",
        help="layers of the head and head-pos sweeps (both sides), or all: at Llama-3.2-1B "
        "shape TL's whole head sweep is 512 forwards of a 1.2B model",
    )
    args = parser.parse_args()
    models = args.models.split(",")
    unknown = [m for m in models if m not in (*BUILTINS, *SHAPES)]
    if unknown:
        parser.error(f"--models {','.join(unknown)}: choose of {', '.join([*BUILTINS, *SHAPES])}")
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, "
          f"{os.cpu_count()} CPUs visible")  # fmt: skip
    head_pos = [int(p) for p in args.positions.split(",")]
    resid = list(range(16))
    if args.resid_positions != "all":
        resid = [int(p) for p in args.resid_positions.split(",")]
    head_layers = None
    if args.head_layers != "all":
        head_layers = [int(la) for la in args.head_layers.split(",")]
    chosen = {"head": None, "head-pos": head_pos, "resid": resid}
    sweeps = [(c, chosen[c]) for c in args.sweeps.split(",")]
    if args.quick:
        sweeps = [("head-pos", head_pos[:1]), ("resid", [0, 8])]
    for name in models:
        model = builtin_model(name) if name in BUILTINS else shaped_model(name)
        label = model.spec if name in BUILTINS else f"{name}-shape"
        full = [("head", None), ("head-pos", head_pos), ("resid", list(range(16)))]
        bench(label, model, sweeps if name in SHAPES else full, args.prompts, head_layers)
        del model


if __name__ == "__main__":
    main()
