"""actstore beside AutoCircuit 1.0.1 on the same model, prompts, corruption and edge graph.

(a) EAP edge scores from both (actstore `attribute --method eap`; AutoCircuit
    mask_gradient_prune_scores(grad_function="logit", answer_function="avg_diff", mask_val=0,
    RESAMPLE from the corrupt prompts)), AutoCircuit's edges mapped to actstore's names: edge-set
    equality, Spearman (signed and |score|), Pearson, the scale between them, top-K overlap.
(b) logit-difference faithfulness (m(C) - m(corr)) / (m(clean) - m(corr)) of the top-K circuits
    with both libraries' exact patching (actstore `circuit --edges K1,K2,… --no-prune`, one
    command for the whole curve; AutoCircuit run_circuits TREE_PATCH + RESAMPLE), and
    AutoCircuit's patching on actstore's ranking (the same edge sets: isolates the patching).
(c) wall clock and peak RSS per phase: actstore as a user types its CLI commands (ingest,
    attribute, one circuit command: each a process paying its imports and model load), actstore
    in one process through its Python API (`--api`), and AutoCircuit in one process (imports,
    HF load + TL conversion, data, patchable model, EAP, circuits). pip is not timed.

Run with the AutoCircuit venv's python (numpy + scipy); actstore runs from the checkout's .venv.
Usage: see run.sh (`bash benchmarks/autocircuit/run.sh small`).
"""

import argparse
import csv
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from scipy.stats import pearsonr, spearmanr

HERE = Path(__file__).resolve().parent
REPO = HERE.parent.parent
ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--model", required=True, help="Hugging Face GPT-2 directory")
ap.add_argument("--dataset", required=True, help="AutoCircuit-format JSON (clean/corrupt)")
ap.add_argument("--workdir", required=True)
ap.add_argument("--batch-size", type=int, default=16)
ap.add_argument("--edges", default="0,10,50,100,200,500,1000,all")
ap.add_argument("--actstore", default=str(REPO / ".venv/bin/actstore"))
ap.add_argument("--actstore-python", default=str(REPO / ".venv/bin/python"))
ap.add_argument("--api", action="store_true", help="also time actstore in one process (API)")
ap.add_argument(
    "--no-extras",
    action="store_true",
    help="skip AutoCircuit's untimed extras (KL, EDGE_PATCH, circuits on actstore's ranking)",
)
ap.add_argument(
    "--ig-steps",
    type=int,
    default=0,
    help="also AutoCircuit's mask-gradient IG and actstore eap-ig (not like-for-like)",
)
ap.add_argument("--tl-process", action="store_true", help="pass --tl-process to ac_side.py")
ap.add_argument(
    "--ac-tail-divergence",
    action="store_true",
    help="pass --tail-divergence to ac_side.py (AutoCircuit's KV-cached shared prefix; one "
    "batch only)",
)
a = ap.parse_args()

work = Path(a.workdir).resolve()
work.mkdir(parents=True, exist_ok=True)
store = work / "store"
env = {**os.environ, "TQDM_DISABLE": "1", "PYTHONUNBUFFERED": "1"}
log = open(work / "commands.log", "w")
res: dict = {"args": vars(a), "actstore": {"phases_s": {}, "peak_rss_mb": {}}, "loadavg": {}}


def uptime(tag: str) -> None:
    res["loadavg"][tag] = os.getloadavg()


def run(cmd: list[str], phase: str | None = None, side: dict | None = None) -> str:
    """Run a command, log it, time it (wall clock) and take its peak RSS (the process and
    its children, from wait4) under `phase`; return its stdout."""
    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t = time.perf_counter()
        p = subprocess.Popen(cmd, stdout=out, stderr=err, text=True, env=env)
        _, status, usage = os.wait4(p.pid, 0)
        dt = time.perf_counter() - t
        p.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        stdout, stderr = out.read(), err.read()
    rss = usage.ru_maxrss / 1024
    log.write(
        f"$ {' '.join(cmd)}\n# {dt:.2f} s, rc {p.returncode}, max RSS {rss:.0f} MB\n"
        f"{stderr[-2000:]}\n"
    )
    log.flush()
    if p.returncode:
        sys.exit(f"failed ({p.returncode}): {' '.join(cmd)}\n{stderr[-3000:]}")
    if phase is not None and side is not None:
        side["phases_s"][phase] = side["phases_s"].get(phase, 0.0) + dt
        peak = side.setdefault("peak_rss_mb", {})
        peak[phase] = max(peak.get(phase, 0.0), rss)
    return stdout


def actstore_side() -> None:
    """The commands as a user types them: ingest, attribute, one circuit command for the curve."""
    side = res["actstore"]
    uptime("actstore_start")
    shutil.rmtree(store, ignore_errors=True)
    x = a.actstore
    run(
        [x, "ingest", str(store), "--model", a.model, "--dataset", a.dataset,
         "--batch-size", str(a.batch_size), "--device", "cpu"],
        "ingest", side,
    )  # fmt: skip
    out = run(
        [x, "attribute", str(store), "--run", "1", "--method", "eap", "--device", "cpu",
         "--format", "csv", "--top", "1"],
        "attribute_eap", side,
    )  # fmt: skip
    side["score_id"] = score_id = int(out.splitlines()[1].split(",")[0])
    out = run(
        [x, "circuit", str(store), "--scores", str(score_id), "--edges", a.edges, "--no-prune",
         "--device", "cpu", "--format", "json"],
        "circuits", side,
    )  # fmt: skip
    side["circuits"] = json.loads(out)
    side["phases_s"]["total"] = sum(side["phases_s"].values())
    uptime("actstore_end")
    scores_sql = "select src, dst, qkv, score from edge_scores where score_id = {}"
    run([x, "export", str(store), "--sql", scores_sql.format(score_id), "--format", "csv",
         "-o", str(work / "actstore_eap.csv")])  # fmt: skip
    side["n_edges"] = sum(1 for _ in open(work / "actstore_eap.csv")) - 1
    if a.ig_steps:  # untimed extra
        out = run([x, "attribute", str(store), "--run", "1", "--method", "eap-ig",
                   "--steps", str(a.ig_steps), "--device", "cpu", "--format", "csv",
                   "--top", "1"])  # fmt: skip
        ig_id = int(out.splitlines()[1].split(",")[0])
        run([x, "export", str(store), "--sql", scores_sql.format(ig_id), "--format", "csv",
             "-o", str(work / "actstore_ig.csv")])  # fmt: skip
    # untimed: what actstore stored and derives, for AutoCircuit's tokens / logits checks
    run([a.actstore_python, str(HERE / "actstore_logits.py"), str(store), "1",
         str(work / "actstore_logits.npz")])  # fmt: skip


def ac_side() -> None:
    uptime("ac_start")
    cmd = [sys.executable, str(HERE / "ac_side.py"), "--model", a.model, "--dataset", a.dataset,
           "--batch-size", str(a.batch_size), "--edges", a.edges, "--out",
           str(work / "ac.json")]  # fmt: skip
    if (work / "actstore_logits.npz").exists():
        cmd += ["--actstore-logits", str(work / "actstore_logits.npz")]
    if not a.no_extras:
        cmd += ["--kl", "--edge-patch", "--actstore-scores", str(work / "actstore_eap.csv")]
    if a.ig_steps:
        cmd += ["--ig-steps", str(a.ig_steps)]
    if a.tl_process:
        cmd += ["--tl-process"]
    if a.ac_tail_divergence:
        cmd += ["--tail-divergence"]
    side: dict = {"phases_s": {}}
    run(cmd, "process", side)
    res["ac"] = json.load(open(work / "ac.json"))
    res["ac"]["process_wall_s"] = side["phases_s"]["process"]
    res["ac"]["process_peak_rss_mb"] = side["peak_rss_mb"]["process"]
    uptime("ac_end")


def api_side() -> None:
    uptime("api_start")
    side: dict = {"phases_s": {}}
    run([a.actstore_python, str(HERE / "actstore_api.py"), str(work / "store_api"), a.model,
         a.dataset, str(a.batch_size), a.edges, str(work / "actstore_api.json")],
        "process", side)  # fmt: skip
    res["actstore_api"] = json.load(open(work / "actstore_api.json"))
    res["actstore_api"]["process_wall_s"] = side["phases_s"]["process"]
    res["actstore_api"]["peak_rss_mb"] = side["peak_rss_mb"]["process"]
    uptime("api_end")


def load_scores(path: Path) -> dict:
    with open(path) as f:
        return {(r["src"], r["dst"], r["qkv"] or ""): float(r["score"]) for r in csv.DictReader(f)}


def top(keys: list, v: np.ndarray, k: int) -> set:
    order = np.argsort(-np.abs(v), kind="stable")[:k]
    return {keys[i] for i in order}


def compare_scores(ours: dict, theirs_rows: list, ks: list[int], tag: str) -> dict:
    theirs = {(s, d, q): v for s, d, q, v in theirs_rows}
    c: dict = {
        "n_actstore": len(ours),
        "n_autocircuit": len(theirs),
        "same_edge_set": set(ours) == set(theirs),
        "only_actstore": sorted(map(str, set(ours) - set(theirs)))[:10],
        "only_autocircuit": sorted(map(str, set(theirs) - set(ours)))[:10],
    }
    keys = sorted(set(ours) & set(theirs))
    x = np.array([ours[k] for k in keys])
    y = np.array([theirs[k] for k in keys])
    c["spearman_signed_(ac_negated)"] = float(spearmanr(x, -y).statistic)
    c["spearman_abs"] = float(spearmanr(np.abs(x), np.abs(y)).statistic)
    c["pearson_signed"] = float(pearsonr(x, y).statistic)
    scale = float(np.dot(x, y) / np.dot(x, x))  # AutoCircuit ≈ scale × actstore
    c["scale_ac_over_actstore"] = scale
    c["max_abs_diff_after_scale"] = float(np.abs(y / scale - x).max())
    c["max_abs_actstore_score"] = float(np.abs(x).max())
    c["rel_err_after_scale"] = c["max_abs_diff_after_scale"] / c["max_abs_actstore_score"]
    c["top_overlap"] = {}
    for k in sorted({50, *[k for k in ks if 0 < k < len(keys)]}):
        inter = len(top(keys, x, k) & top(keys, y, k))
        c["top_overlap"][k] = {"intersection": inter, "frac": inter / k}
    c["tag"] = tag
    return c


actstore_side()  # first: the AutoCircuit side checks its tokens, logits and patching against it
ac_side()
if a.api:
    api_side()

ac = res["ac"]
n_edges = res["actstore"]["n_edges"]
ks = [n_edges if k == "all" else int(k) for k in a.edges.split(",")]
res["eap"] = compare_scores(load_scores(work / "actstore_eap.csv"), ac["eap"], ks, "eap")
if a.ig_steps and "eap_ig" in ac:
    res["eap_ig_not_like_for_like"] = compare_scores(
        load_scores(work / "actstore_ig.csv"), ac["eap_ig"], ks, "eap-ig vs mask-gradient IG"
    )

# ---- faithfulness ----
ours = {r["top_n"]: r for r in res["actstore"]["circuits"]}
theirs = {r["k"]: r for r in ac["circuits"]}
cross = {r["k"]: r for r in ac.get("circuits_on_actstore_ranking", [])}
edge_patch = {r["k"]: r for r in ac.get("circuits_edge_patch", [])}
rows = []
for k in ks:
    o, t_ = ours[k], theirs.get(k, {})
    rows.append(
        {
            "K": k,
            "actstore_faithfulness": o["faithfulness"],
            "ac_faithfulness": t_.get("faithfulness"),
            "ac_faithfulness_on_actstore_ranking": cross.get(k, {}).get("faithfulness"),
            "actstore_logit_diff": o["metric_value"],
            "ac_logit_diff": t_.get("metric_value"),
            "ac_logit_diff_on_actstore_ranking": cross.get(k, {}).get("metric_value"),
            "ac_edges_kept": t_.get("n_kept"),
            "ac_answer_diff_percent": t_.get("answer_diff_percent"),
            "ac_kl_clean_vs_circuit": t_.get("kl_clean_vs_circuit"),
            "ac_edge_patch_faithfulness": edge_patch.get(k, {}).get("faithfulness"),
        }
    )
res["faithfulness"] = rows
first = res["actstore"]["circuits"][0]
res["endpoints"] = {
    "actstore_clean": first["clean_metric"],
    "actstore_corrupted": first["corrupted_metric"],
    "ac_clean": ac["clean_metric"],
    "ac_corrupted": ac["corrupted_metric"],
}
same = [r for r in rows if r["ac_logit_diff_on_actstore_ranking"] is not None]
if same:
    res["max_abs_logit_diff_gap_same_edges"] = max(
        abs(r["actstore_logit_diff"] - r["ac_logit_diff_on_actstore_ranking"]) for r in same
    )
    res["max_abs_faithfulness_gap_same_edges"] = max(
        abs(r["actstore_faithfulness"] - r["ac_faithfulness_on_actstore_ranking"]) for r in same
    )
res["max_abs_faithfulness_gap_own_rankings"] = max(
    abs(r["actstore_faithfulness"] - r["ac_faithfulness"])
    for r in rows
    if r["ac_faithfulness"] is not None
)
json.dump(res, open(work / "results.json", "w"), indent=1, default=str)

# ---- summary: the phases' table (the README's), then the agreement and the details ----
L: list[str] = []
p = L.append
cli, acp = res["actstore"]["phases_s"], ac["phases_s"]
cli_rss = max(res["actstore"]["peak_rss_mb"].values())
api = res.get("actstore_api")
n_k = len(ks)


def secs(v: float | None, each: bool = False) -> str:
    if v is None:
        return "–"
    return f"{v:.1f} s ({v / n_k:.1f} s each)" if each else f"{v:.1f} s"


def gb(mb: float | None) -> str:
    return "–" if mb is None else f"{mb / 1024:.2f} GB"


ac_setup = sum(acp.get(k, 0.0) for k in ("import", "load", "data", "patchable_model"))
table = [
    ("ingest", secs(cli["ingest"]), secs(api and api["phases_s"]["ingest"]), "–"),
    (
        "EAP scores",
        secs(cli["attribute_eap"]),
        secs(api and api["phases_s"]["attribute_eap"]),
        secs(acp["eap"]),
    ),
    (
        f"{n_k} exact circuits",
        secs(cli["circuits"], True),
        secs(api and api["phases_s"]["circuits"], True),
        secs(acp["circuits"], True),
    ),
    (
        "total",
        secs(cli["total"]),
        secs(api and api["process_wall_s"]),
        f"{acp['total_timed']:.1f} s (incl. import, load, data, graph {ac_setup:.1f} s)",
    ),
    ("peak RSS", gb(cli_rss), gb(api and api["peak_rss_mb"]), gb(ac["process_peak_rss_mb"])),
]
p(
    f"| {ac['n_prompts']} prompts, batches of {a.batch_size} | actstore CLI | actstore API, "
    "one process | AutoCircuit, one process |"
)
p("|---|---|---|---|")
for row in table:
    p("| " + " | ".join(row) + " |")
p("")
e = res["eap"]
p(
    f"agreement: same edge set {e['same_edge_set']} ({e['n_actstore']} edges); EAP Spearman "
    f"{e['spearman_signed_(ac_negated)']:.6f} (AutoCircuit = {e['scale_ac_over_actstore']:.4f} × "
    f"actstore, relative difference {e['rel_err_after_scale']:.2g}); faithfulness max |diff| "
    f"{res['max_abs_faithfulness_gap_own_rankings']:.2g} (own rankings)"
    + (f", {res['max_abs_faithfulness_gap_same_edges']:.2g} on the same edge sets" if same else "")
)
p(
    f"per circuit: actstore CLI {cli['circuits'] / n_k:.2f} s, AutoCircuit run_circuits "
    f"{acp['circuits'] / n_k:.2f} s ({acp['circuits'] / cli['circuits']:.2f}× ours); CLI end to "
    f"end {cli['total']:.1f} s vs AutoCircuit's timed phases {acp['total_timed']:.1f} s; peak RSS "
    f"{cli_rss / ac['process_peak_rss_mb']:.2f} of AutoCircuit's"
)
p("")
p(
    f"model {a.model}  dataset {a.dataset}  batch {a.batch_size}  prompts {ac['n_prompts']} "
    f"({ac['n_batches']} AutoCircuit batches)"
)
p(f"checks: {json.dumps(ac['checks'])}")
p(
    "top-K overlap (|score|): "
    + ", ".join(f"{k}: {v['intersection']}/{k}" for k, v in e["top_overlap"].items())
)
if "eap_ig_not_like_for_like" in res:
    g = res["eap_ig_not_like_for_like"]
    p(
        f"EAP-IG (NOT like for like): spearman signed {g['spearman_signed_(ac_negated)']:.4f}, "
        f"|score| {g['spearman_abs']:.4f}, top-50 {g['top_overlap'][50]['intersection']}/50"
    )
ep = res["endpoints"]
p(
    f"logit diff clean/corrupted: actstore {ep['actstore_clean']:.6g} / "
    f"{ep['actstore_corrupted']:.6g}, AutoCircuit {ep['ac_clean']:.6g} / {ep['ac_corrupted']:.6g}"
)
p(
    f"{'K':>6} {'actstore':>10} {'AC':>10} {'AC@as-rank':>10} {'AC kept':>7} {'AC %':>8} "
    f"{'AC KL':>9} {'AC EDGE_P':>9}"
)


def f(v, w=10, d=5):
    return f"{v:>{w}.{d}f}" if isinstance(v, float) else f"{'-':>{w}}"


for r in rows:
    p(
        f"{r['K']:>6} {f(r['actstore_faithfulness'])} {f(r['ac_faithfulness'])} "
        f"{f(r['ac_faithfulness_on_actstore_ranking'])} {str(r['ac_edges_kept']):>7} "
        f"{f(r['ac_answer_diff_percent'], 8, 2)} {f(r['ac_kl_clean_vs_circuit'], 9, 6)} "
        f"{f(r['ac_edge_patch_faithfulness'], 9, 4)}"
    )
if same:
    p(f"same edge sets: max |logit diff gap| {res['max_abs_logit_diff_gap_same_edges']:.3g}")
p("times (s, wall): actstore CLI " + ", ".join(f"{k} {v:.1f}" for k, v in cli.items()))
p("                 AutoCircuit  " + ", ".join(f"{k} {v:.1f}" for k, v in acp.items()))
p(
    "                 AutoCircuit untimed extras "
    + ", ".join(f"{k} {v:.1f}" for k, v in ac["phases_untimed_s"].items())
)
if api:
    p(
        "                 actstore API (1 process) "
        + ", ".join(f"{k} {v:.1f}" for k, v in api["phases_s"].items())
    )
p(
    "peak RSS (MB): actstore CLI "
    + json.dumps({k: round(v) for k, v in res["actstore"]["peak_rss_mb"].items()})
)
p("load average at start/end of each side: " + json.dumps(res["loadavg"]))
text = "\n".join(L)
(work / "summary.txt").write_text(text + "\n")
print(text)
