"""AutoCircuit side of the comparison (run with the AutoCircuit venv python).

Loads the Hugging Face GPT-2 directory into a TransformerLens 2.4 HookedTransformer (weights
converted with TL's own convert_gpt2_weights, no folding/centering unless --tl-process), makes it
patchable (factorized graph, separate q/k/v inputs, all token positions at once, metric at the
last position), computes EAP scores with mask_gradient_prune_scores (grad_function="logit",
answer_function="avg_diff", mask_val=0.0, RESAMPLE ablation from the corrupt prompts: the setting
that AutoCircuit documents as exactly Syed et al.'s EAP), then evaluates the top-K circuits with
run_circuits(PatchType.TREE_PATCH, AblationType.RESAMPLE): input = clean prompts, every edge outside
the circuit carries the corrupt run's source output (Hanna et al.'s evaluation, which is what
actstore circuit computes). Writes one JSON with scores (actstore edge names), circuit metrics,
timings and checks.

Usage: python ac_side.py --model DIR --dataset FILE.json --batch-size B --edges 10,50,...
                         --out OUT.json [--actstore-logits NPZ] [--actstore-scores CSV]
                         [--kl] [--edge-patch] [--ig-steps S] [--tl-process]
                         [--tail-divergence]
"""

import time

T_START = time.perf_counter()
PHASES: dict[str, float] = {}

import argparse  # noqa: E402
import csv  # noqa: E402
import json  # noqa: E402
import os  # noqa: E402
import re  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch as t  # noqa: E402
import transformer_lens as tl  # noqa: E402
from auto_circuit.data import load_datasets_from_json  # noqa: E402
from auto_circuit.metrics.prune_metrics.answer_diff_percent import answer_diff_percent  # noqa: E402
from auto_circuit.metrics.prune_metrics.kl_div import measure_kl_div  # noqa: E402
from auto_circuit.prune import run_circuits  # noqa: E402
from auto_circuit.prune_algos.mask_gradient import mask_gradient_prune_scores  # noqa: E402
from auto_circuit.types import AblationType, PatchType  # noqa: E402
from auto_circuit.utils.graph_utils import patchable_model  # noqa: E402
from auto_circuit.utils.tensor_ops import batch_avg_answer_diff  # noqa: E402
from transformer_lens.pretrained.weight_conversions.gpt2 import convert_gpt2_weights  # noqa: E402
from transformers import AutoTokenizer, GPT2LMHeadModel  # noqa: E402

PHASES["import"] = time.perf_counter() - T_START

ap = argparse.ArgumentParser()
ap.add_argument("--model", required=True)
ap.add_argument("--dataset", required=True)
ap.add_argument("--batch-size", type=int, required=True)
ap.add_argument("--edges", required=True, help="comma-separated K; 'all' = every edge")
ap.add_argument("--out", required=True)
ap.add_argument("--actstore-logits", help="npz from actstore_logits.py (logits/tokens check)")
ap.add_argument(
    "--actstore-scores",
    help="actstore edge_scores CSV: also run AutoCircuit's "
    "circuits on actstore's ranking (same edge sets, isolates the patching)",
)
ap.add_argument("--kl", action="store_true", help="also AutoCircuit's measure_kl_div per K")
ap.add_argument(
    "--edge-patch",
    action="store_true",
    help="also AutoCircuit's default PatchType.EDGE_PATCH (not like-for-like)",
)
ap.add_argument(
    "--ig-steps",
    type=int,
    default=0,
    help="also mask_gradient with integrated_grad_samples=S (not like-for-like)",
)
ap.add_argument(
    "--tail-divergence",
    action="store_true",
    help="AutoCircuit's own speed-up (its Task loader's default): the prompts' shared "
    "clean/corrupt prefix goes into a frozen KV cache and only the tail is run. The "
    "cache holds the first batch's prefixes, so it is exact only with one batch",
)
ap.add_argument(
    "--tl-process",
    action="store_true",
    help="fold_ln/center_writing_weights/center_unembed/fold_value_biases as "
    "auto_circuit.experiment_utils.load_tl_model does (default: raw weights)",
)
a = ap.parse_args()
dev = t.device("cpu")
out: dict = {"phases_s": PHASES, "checks": {}, "settings": vars(a).copy()}
out["settings"]["torch_threads"] = t.get_num_threads()
t.manual_seed(0)


def tick(name: str, t0: float) -> float:
    PHASES[name] = PHASES.get(name, 0.0) + time.perf_counter() - t0
    return time.perf_counter()


# ---- model load: HF directory -> HookedTransformer (timed as "load") ----
t0 = time.perf_counter()
hf = GPT2LMHeadModel.from_pretrained(a.model, attn_implementation="eager").eval()
tok = AutoTokenizer.from_pretrained(a.model)
hc = hf.config
cfg = tl.HookedTransformerConfig(
    n_layers=hc.n_layer,
    d_model=hc.n_embd,
    n_ctx=hc.n_positions,
    d_head=hc.n_embd // hc.n_head,
    n_heads=hc.n_head,
    d_mlp=hc.n_inner or 4 * hc.n_embd,
    d_vocab=hc.vocab_size,
    act_fn=hc.activation_function,
    eps=hc.layer_norm_epsilon,
    normalization_type="LN",
    positional_embedding_type="standard",
    use_attn_scale=True,
    scale_attn_by_inverse_layer_idx=hc.scale_attn_by_inverse_layer_idx,
    original_architecture="GPT2LMHeadModel",
    default_prepend_bos=True,
    device="cpu",
)
model = tl.HookedTransformer(cfg, tokenizer=tok, move_to_device=True)
proc = dict(
    fold_ln=a.tl_process,
    center_writing_weights=a.tl_process,
    center_unembed=a.tl_process,
    fold_value_biases=a.tl_process,
)
model.load_and_process_state_dict(convert_gpt2_weights(hf, cfg), **proc)
# what auto_circuit.experiment_utils.load_tl_model sets for edge patching with separate q/k/v
model.cfg.use_attn_result = True
model.cfg.use_attn_in = True
model.cfg.use_split_qkv_input = True
model.cfg.use_hook_mlp_in = True
model.eval()
for p in model.parameters():
    p.requires_grad = False
t0 = tick("load", t0)

# ---- dataset (timed as "data") ----
n_prompts = len(json.load(open(a.dataset))["prompts"])
loader, _ = load_datasets_from_json(
    model=model,
    path=Path(a.dataset),
    device=dev,
    prepend_bos=True,
    batch_size=a.batch_size,
    train_test_size=(n_prompts, 0),
    shuffle=False,
    return_seq_length=False,
    tail_divergence=a.tail_divergence,
    pad=True,
)
batches = list(loader)
t0 = tick("data", t0)
if a.tail_divergence and len(batches) != 1:
    raise SystemExit(
        "--tail-divergence: AutoCircuit's KV cache holds the first batch's prefixes; "
        "use one batch (batch size = number of prompts)"
    )
out["n_prompts"], out["n_batches"] = n_prompts, len(batches)
if n_prompts % a.batch_size:
    out["checks"]["dropped_prompts"] = n_prompts % a.batch_size  # PromptDataLoader drop_last

# ---- checks (untimed): tokens and clean logits against actstore and HF ----
c0 = time.perf_counter()
div = loader.diverge_idx  # 0 unless --tail-divergence
clean_tok = t.cat([b.clean for b in batches])  # (the tails after `div` with --tail-divergence)
corrupt_tok = t.cat([b.corrupt for b in batches])
ck = out["checks"]
ck["diverge_idx"] = div
z = np.load(a.actstore_logits) if a.actstore_logits else None
n = clean_tok.shape[0]
full = clean_tok if div == 0 else (t.from_numpy(z["tokens"][:n]).long() if z is not None else None)
center = (lambda x: x - x.mean(-1, keepdim=True)) if a.tl_process else (lambda x: x)
with t.no_grad():
    if (
        full is not None
    ):  # center_unembed (--tl-process) shifts each position's logits by a constant
        tl_logits = center(
            t.cat([model(full[i : i + a.batch_size]) for i in range(0, n, a.batch_size)])
        )
        hf_logits = center(
            t.cat([hf(full[i : i + a.batch_size]).logits for i in range(0, n, a.batch_size)])
        )
        ck["logits_max_abs_diff_tl_vs_hf"] = float((tl_logits - hf_logits).abs().max())
        ck["logits_max_abs"] = float(tl_logits.abs().max())
    if div:  # what AutoCircuit computes with the prefix in its KV cache
        tail_logits = center(
            t.cat([model(b.clean, past_kv_cache=loader.kv_cache) for b in batches])
        )
if z is not None:
    ck["tokens_equal_actstore_clean"] = bool(
        np.array_equal(z["tokens"][:n, div:], clean_tok.numpy())
    )
    ck["tokens_equal_actstore_corrupt"] = bool(
        np.array_equal(z["corrupted_tokens"][:n, div:], corrupt_tok.numpy())
    )
    ans = t.cat([b.answers for b in batches]).reshape(n, -1)
    wrong = t.cat([b.wrong_answers for b in batches]).reshape(n, -1)
    ck["answers_equal_actstore"] = bool(
        ans.shape[1] == 1
        and np.array_equal(z["answer_token"][:n], ans[:, 0].numpy())
        and wrong.shape[1] == 1
        and np.array_equal(z["wrong_answer_token"][:n], wrong[:, 0].numpy())
    )
    bridge = center(t.from_numpy(z["bridge_logits"][:n]))
    final = center(t.from_numpy(z["final_logits"][:n]))
    ck["logits_max_abs_diff_tl_vs_actstore_bridge_all_pos"] = float(
        (tl_logits - bridge).abs().max()
    )
    ck["logits_max_abs_diff_tl_vs_actstore_derived_final"] = float(
        (tl_logits[:, -1] - final).abs().max()
    )
    ck["logits_max_abs_diff_hf_vs_actstore_bridge_all_pos"] = float(
        (hf_logits - bridge).abs().max()
    )
    if div:
        ck["logits_max_abs_diff_tl_kv_tail_vs_actstore_bridge"] = float(
            (tail_logits - bridge[:, div:]).abs().max()
        )
    del bridge, final
for name in ("tl_logits", "hf_logits", "tail_logits"):
    globals().pop(name, None)
PHASES_UNTIMED = {"checks": time.perf_counter() - c0}

# ---- patchable model (timed) ----
t0 = time.perf_counter()
pmodel = patchable_model(
    model,
    factorized=True,
    slice_output="last_seq",
    seq_len=None,
    separate_qkv=True,
    kv_caches=(loader.kv_cache,),
    device=dev,
)
t0 = tick("patchable_model", t0)
out["n_edges"] = len(pmodel.edges)
out["n_srcs"], out["n_dests"] = len(pmodel.srcs), len(pmodel.dests)


def src_name(s: str) -> str:
    if s == "Resid Start":
        return "input"
    if m := re.fullmatch(r"A(\d+)\.(\d+)", s):
        return f"a{m[1]}.h{m[2]}"
    if m := re.fullmatch(r"MLP (\d+)", s):
        return f"m{m[1]}"
    raise ValueError(s)


def dst_name(d: str) -> tuple[str, str]:
    if d == "Resid End":
        return "logits", ""
    if m := re.fullmatch(r"A(\d+)\.(\d+)\.([QKV])", d):
        return f"a{m[1]}.h{m[2]}", m[3].lower()
    if m := re.fullmatch(r"MLP (\d+)", d):
        return f"m{m[1]}", ""
    raise ValueError(d)


edges = sorted(pmodel.edges, key=lambda e: (e.dest.module_name, e.patch_idx))
keys = [(src_name(e.src.name), *dst_name(e.dest.name)) for e in edges]


def flat(ps) -> list[float]:
    return [float(ps[e.dest.module_name][e.patch_idx]) for e in edges]


# ---- EAP (timed): the setting AutoCircuit documents as exactly EAP ----
t0 = time.perf_counter()
eap = mask_gradient_prune_scores(
    pmodel,
    loader,
    None,
    grad_function="logit",
    answer_function="avg_diff",
    mask_val=0.0,
    ablation_type=AblationType.RESAMPLE,
    clean_corrupt="corrupt",
)
t0 = tick("eap", t0)
out["eap"] = [[*k, s] for k, s in zip(keys, flat(eap), strict=True)]

# ---- circuits (timed): TREE_PATCH + RESAMPLE, top-K by |score|, plus clean/corrupt endpoints ----
n_edges = len(edges)
ks = [n_edges if k == "all" else int(k) for k in a.edges.split(",")]


def logit_diff(outs: dict) -> float:
    return float(t.stack([batch_avg_answer_diff(outs[b.key], b) for b in batches]).mean())


def circuits(ps, patch_type=PatchType.TREE_PATCH) -> tuple[dict, dict]:
    circ = run_circuits(
        pmodel, loader, ks, ps, patch_type=patch_type, ablation_type=AblationType.RESAMPLE
    )
    return circ, {int(n): logit_diff(o) for n, o in circ.items()}


t0 = time.perf_counter()
with t.inference_mode():
    clean_outs = {b.key: pmodel(b.clean)[pmodel.out_slice] for b in batches}
    corrupt_outs = {b.key: pmodel(b.corrupt)[pmodel.out_slice] for b in batches}
m_clean, m_corrupt = logit_diff(clean_outs), logit_diff(corrupt_outs)
circ, values = circuits(eap)
t0 = tick("circuits", t0)


def faith(v: float) -> float:
    return (v - m_corrupt) / (m_clean - m_corrupt)


def table(circ: dict, values: dict, extra: bool) -> list[dict]:
    rows = []
    order = sorted(values)  # run_circuits keys: edges actually kept (ties can add some)
    native = dict(answer_diff_percent(pmodel, loader, circ, "logits", True)[0]) if extra else {}
    for k, n in zip(sorted(ks), order, strict=False):
        r = {"k": k, "n_kept": n, "metric_value": values[n], "faithfulness": faith(values[n])}
        if extra:
            r["answer_diff_percent"] = native[n]  # AutoCircuit's own: mean(C) / mean(clean) * 100
        rows.append(r)
    return rows


c0 = time.perf_counter()
out["clean_metric"], out["corrupted_metric"] = m_clean, m_corrupt
out["circuits"] = table(circ, values, extra=True)
if a.kl:
    kl = dict(measure_kl_div(pmodel, loader, circ, compare_to_clean=True))
    kl_corrupt = float(
        t.nn.functional.kl_div(
            t.cat([corrupt_outs[b.key] for b in batches]).log_softmax(-1),
            t.cat([clean_outs[b.key] for b in batches]).log_softmax(-1),
            reduction="batchmean",
            log_target=True,
        )
    )
    out["kl_corrupted"] = kl_corrupt
    for r in out["circuits"]:
        r["kl_clean_vs_circuit"] = kl[r["n_kept"]]
        r["kl_faithfulness"] = 1 - kl[r["n_kept"]] / kl_corrupt
PHASES_UNTIMED["circuit_extras"] = time.perf_counter() - c0
del circ

# ---- cross-check (untimed): AutoCircuit's patching on actstore's ranking ----
if a.actstore_scores:
    c0 = time.perf_counter()
    theirs = {}
    with open(a.actstore_scores) as f:
        for row in csv.DictReader(f):
            theirs[(row["src"], row["dst"], row["qkv"] or "")] = float(row["score"])
    ps = {name: t.zeros_like(v) for name, v in eap.items()}
    for e, k in zip(edges, keys, strict=True):
        ps[e.dest.module_name][e.patch_idx] = theirs[k]
    circ2, values2 = circuits(ps)
    out["circuits_on_actstore_ranking"] = table(circ2, values2, extra=False)
    del circ2
    PHASES_UNTIMED["cross_check"] = time.perf_counter() - c0

if a.edge_patch:  # AutoCircuit's default: input corrupt, circuit edges get the clean run's value
    c0 = time.perf_counter()
    circ3, values3 = circuits(eap, PatchType.EDGE_PATCH)
    out["circuits_edge_patch"] = [
        {"k": k, "n_kept": n, "metric_value": values3[n], "faithfulness": faith(values3[n])}
        for k, n in zip(sorted(ks), sorted(values3), strict=False)
    ]
    del circ3
    PHASES_UNTIMED["edge_patch"] = time.perf_counter() - c0

if a.ig_steps:
    c0 = time.perf_counter()
    ig = mask_gradient_prune_scores(
        pmodel,
        loader,
        None,
        grad_function="logit",
        answer_function="avg_diff",
        integrated_grad_samples=a.ig_steps,
        ablation_type=AblationType.RESAMPLE,
        clean_corrupt="corrupt",
    )
    out["eap_ig"] = [[*k, s] for k, s in zip(keys, flat(ig), strict=True)]
    PHASES_UNTIMED["eap_ig"] = time.perf_counter() - c0

PHASES["total_timed"] = sum(v for k, v in PHASES.items())
out["phases_untimed_s"] = PHASES_UNTIMED
out["process_wall_s"] = time.perf_counter() - T_START
try:
    import resource

    out["peak_rss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
except ImportError:
    pass
out["load_avg"] = os.getloadavg()
json.dump(out, open(a.out, "w"), indent=1)
print(json.dumps({k: out[k] for k in ("phases_s", "checks", "n_edges")}, indent=1))
