"""Attribution (AtP, EAP, EAP-IG) and circuits, checked against independent hooked TL forwards.

The references (tests/support/edge_reference.py) use TransformerLens' own modules through the
bridge's hooks (hook_z, hook_mlp_out, hook_q/k/v_input, hook_mlp_in, ln_final.hook_in), not
actstore's EdgeModel.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from edge_reference import (
    eap_scores,
    hooked_circuit_metric,
    hooked_edge_effects,
    logit_diff,
    sample_edges,
)
from tree_check import assert_tree_equals_dense

from actstore.app.cli import main
from actstore.core.store import Store
from actstore.model.adapter import load_model
from actstore.model.model_spec import BUILTIN_DIR
from queries.attribution import Graph, attribute, circuit, score_graph, stored_curve, top_edges
from queries.attribution.edge_batches import edge_reader, read_batch
from queries.attribution.edge_model import EdgeModel
from queries.core.reader import Reader


def trained_or_random() -> list:
    """toy-random always; toy too once its trained weights are on disk, in the slow tier (the
    same architecture and code paths as toy-random)."""
    names: list = ["toy-random"]
    if (BUILTIN_DIR / "toy" / "model.safetensors").exists():
        names.append(pytest.param("toy", marks=pytest.mark.slow))
    return names


@pytest.fixture(scope="module", params=trained_or_random())
def setup(request, tmp_path_factory):
    """(store, adapter, run data as tensors) for an IOI run of 16 prompts on each toy model."""
    from ingest.runner import ingest

    path = tmp_path_factory.mktemp("attr") / "store"
    ingest(Store(path, create=True), model=request.param, task="ioi", n=16, batch_size=8)
    store = Store(path)
    return store, load_model(request.param), run_tensors(store)


def run_tensors(store: Store) -> dict:
    """Run 1's tokens, final positions, answers and answer sets, read from the store."""
    prompts = store.prompts(1)
    return {
        "clean": torch.as_tensor(store.read(1, "clean", "tokens"), dtype=torch.long),
        "corrupted": torch.as_tensor(store.read(1, "corrupted", "tokens"), dtype=torch.long),
        "last": torch.as_tensor(prompts["seq_len"].to_numpy() - 1, dtype=torch.long),
        "answer": torch.as_tensor(prompts["answer_token"].to_numpy(), dtype=torch.long),
        "wrong": torch.as_tensor(prompts["wrong_answer_token"].to_numpy(), dtype=torch.long),
        "correct": prompts["answer_tokens"].to_list(),
        "incorrect": prompts["wrong_answer_tokens"].to_list(),
    }


def test_gpt2_small_has_32491_edges():
    from transformers import GPT2Config

    g = Graph.from_config(GPT2Config())  # n_layer=12, n_head=12: configuration only
    assert g.n_edges == 32491
    assert int(g.real.sum()) == 32491
    assert (g.n_forward, g.n_backward) == (157, 445)
    assert g.forward_names[:2] == ["input", "a0.h0"] and g.forward_names[-1] == "m11"
    assert g.backward_names[-1] == ("logits", None) and g.backward_names[12] == ("a0.h0", "k")
    frame = g.edge_frame(np.zeros((g.n_forward, g.n_backward)))
    assert frame.height == 32491
    assert frame.filter(frame["dst"] == "logits").height == 157
    assert frame["qkv"].null_count() == 157 + sum(13 * layer + 13 for layer in range(12))


def test_edge_forward_reproduces_model_and_corrupted_run(setup):
    store, adapter, data = setup
    model = EdgeModel(adapter)
    g = model.graph
    with torch.no_grad():
        full = adapter.hooked_logits(data["clean"])
    rows = torch.arange(full.shape[0])
    reader = edge_reader(store, store.run(1), model)
    for batch in (read_batch(reader, span, model) for span in reader.spans()):
        with torch.no_grad():
            kept = model.run(batch.clean[:, :, 0], batch.last)
            none = model.run(batch.clean[:, :, 0], batch.last, batch.corrupted,
                             torch.ones(g.n_forward, g.n_backward))  # fmt: skip
        sel = slice(batch.lo, batch.hi)
        reference = full[rows[sel], data["last"][sel]]
        assert (kept.logits - reference).abs().max() < 1e-5
        assert (none.logits - batch.corrupted_logits).abs().max() < 1e-5


def test_node_atp_is_the_gradient_estimate_and_tracks_head_patching(setup):
    store, adapter, data = setup
    scores = attribute(store, 1, "atp")
    assert scores["dst"].null_count() == scores.height
    atp = dict(zip(scores["src"], scores["score"], strict=True))
    n_layers, n_heads = adapter.shape.n_layers, adapter.shape.n_heads
    with torch.no_grad():
        _, clean = adapter.run_with_cache(data["clean"])
    zs = {}

    def grab(name: str):
        def fn(act, hook):
            zs[name] = act  # not detached: the gradient must include every downstream path
            return act

        return fn

    names = [f"blocks.{layer}.attn.hook_z" for layer in range(n_layers)]
    hooks = [(n, grab(n)) for n in names]
    corrupted_value = logit_diff(adapter.hooked_logits(data["corrupted"], hooks), data)
    grads = torch.autograd.grad(corrupted_value, [zs[n] for n in names])
    estimate, exact = [], []
    for layer, (name, grad) in enumerate(zip(names, grads, strict=True)):
        delta = clean[name] - zs[name].detach()
        for h in range(n_heads):
            linear = float((delta[:, :, h] * grad[:, :, h]).sum())
            assert atp[f"a{layer}.h{h}"] == pytest.approx(linear, rel=1e-4, abs=1e-7)

            def patch(act, hook, h=h, name=name):
                act = act.clone()
                act[:, :, h] = clean[name][:, :, h]
                return act

            with torch.no_grad():
                patched = logit_diff(
                    adapter.hooked_logits(data["corrupted"], [(name, patch)]), data
                )
            estimate.append(linear)
            exact.append(float(patched - corrupted_value))
    corr = np.corrcoef(estimate, exact)[0, 1]
    assert corr > 0.8, f"AtP vs exact head patching correlation {corr:.3f}"


def test_eap_equals_difference_times_hooked_gradient(setup):
    store, adapter, data = setup
    g = Graph.from_config(adapter.shape)
    expected = eap_scores(adapter, data)
    scores = attribute(store, 1, "eap")
    sid = int(scores["score_id"][0])
    _, _, stored = score_graph(store, sid)
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(stored, expected, atol=1e-5 * scale, rtol=0)
    top = scores.row(0, named=True)
    f, c = g.cell_of(top["src"], top["dst"], top["qkv"])
    assert top["score"] == pytest.approx(expected[f, c], rel=1e-4)


def test_eap_ig_one_step_equals_eap_and_more_steps_differ(setup):
    store, _, _ = setup
    ids = {}
    for method, steps in [("eap", None), ("eap-ig", 1), ("eap-ig-activations", 1), ("eap-ig", 5)]:
        ids[(method, steps)] = int(attribute(store, 1, method, steps)["score_id"][0])
    eap = score_graph(store, ids[("eap", None)])[2]
    scale = np.abs(eap).max()
    for key in [("eap-ig", 1), ("eap-ig-activations", 1)]:
        np.testing.assert_allclose(score_graph(store, ids[key])[2], eap, atol=1e-5 * scale)
    assert np.abs(score_graph(store, ids[("eap-ig", 5)])[2] - eap).max() > 1e-4 * scale


def test_full_and_empty_circuits_have_faithfulness_one_and_zero(setup):
    store, _, _ = setup
    sid = int(attribute(store, 1, "eap-ig")["score_id"][0])
    n_edges = score_graph(store, sid)[1].n_edges
    full = circuit(store, sid, edges=n_edges).row(0, named=True)
    empty = circuit(store, sid, edges=0).row(0, named=True)
    assert full["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    assert empty["faithfulness"] == pytest.approx(0.0, abs=1e-4)
    assert (full["n_edges"], empty["n_edges"]) == (n_edges, 0)


def test_faithfulness_equals_hooked_edge_patching(setup):
    store, adapter, data = setup
    sid = int(attribute(store, 1, "eap-ig")["score_id"][0])
    _, graph, values = score_graph(store, sid)
    for n in (graph.n_edges // 10, graph.n_edges // 3):
        row = circuit(store, sid, edges=n, prune=False).row(0, named=True)
        mask = top_edges(graph, values, n, prune=False)
        edges = store.query(
            "SELECT count(*) FROM circuit_edges WHERE circuit_id = ?", [row["circuit_id"]]
        ).item()
        assert edges == n == int(mask.sum())
        assert row["metric_value"] == pytest.approx(
            hooked_circuit_metric(adapter, data, mask), abs=1e-5
        )
        pruned = circuit(store, sid, edges=n, prune=True).row(0, named=True)
        assert pruned["n_edges"] <= n
        assert pruned["metric_value"] == pytest.approx(row["metric_value"], abs=1e-5)


def test_faithfulness_search_finds_smallest_on_its_curve(setup):
    store, _, _ = setup
    sid = int(attribute(store, 1, "eap")["score_id"][0])
    row = circuit(store, sid, faithfulness=0.85).row(0, named=True)
    assert row["faithfulness"] >= 0.85
    curve = stored_curve(store, row["circuit_id"])
    below = curve.filter(curve["top_n"] == row["top_n"] - 1)
    assert below.height == 1 and below["faithfulness"][0] < 0.85
    assert curve["top_n"][0] == 0
    again = circuit(store, sid, faithfulness=0.85)
    assert again["circuit_id"][0] == row["circuit_id"]


def test_cached_queries_do_not_import_torch(setup):
    store, _, _ = setup
    attribute(store, 1, "eap")
    sid = int(attribute(store, 1, "eap")["score_id"][0])
    circuit(store, sid, edges=5)
    code = (
        "import sys, actstore; s = actstore.open(sys.argv[1]); "
        "a = s.attribute(1, 'eap'); c = s.circuit(int(a['score_id'][0]), edges=5); "
        "print(a.height, c['circuit_id'][0], 'torch' in sys.modules)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code, str(store.path)],
        capture_output=True, text=True, check=True, cwd=Path(__file__).parent.parent,
    )  # fmt: skip
    n_edges = Graph.from_config(setup[1].shape).n_edges
    assert out.stdout.split()[0] == str(n_edges) and out.stdout.split()[-1] == "False"


def test_cli_attribute_and_circuit(setup):
    store, _, _ = setup
    runner = CliRunner()
    res = runner.invoke(
        main, ["attribute", str(store.path), "--run", "1", "--method", "eap", "--top", "3",
               "--format", "csv"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0] == "score_id,run_id,method,src,dst,qkv,score" and len(lines) == 4
    sid = lines[1].split(",")[0]
    res = runner.invoke(main, ["circuit", str(store.path), "--scores", sid, "--edges", "20",
                               "--format", "json"])  # fmt: skip
    assert res.exit_code == 0, res.output
    assert '"n_edges"' in res.stdout
    bad = runner.invoke(main, ["attribute", str(store.path), "--run", "1", "--method", "eap",
                               "--steps", "3"])  # fmt: skip
    assert bad.exit_code == 2 and "--steps" in bad.output
    node = attribute(store, 1, "atp")
    bad = runner.invoke(main, ["circuit", str(store.path), "--scores",
                               str(node["score_id"][0]), "--edges", "5"])  # fmt: skip
    assert bad.exit_code == 2 and "node level" in bad.output
    bad = runner.invoke(main, ["circuit", str(store.path), "--scores", sid])
    assert bad.exit_code == 2 and "exactly one" in bad.output


def test_tree_patching_equals_dense_edge_forward(setup):
    store, adapter, _ = setup
    starts = assert_tree_equals_dense(store, store.run(1), EdgeModel(adapter))
    assert max(starts) > 0  # the shared clean/corrupted prefix was computed once, not per circuit


def test_curve_in_one_pass_equals_sizes_one_by_one(setup):
    store, _, _ = setup
    sid = int(attribute(store, 1, "eap")["score_id"][0])
    n_edges = score_graph(store, sid)[1].n_edges
    sizes = [0, 3, 10, 50, n_edges // 2, n_edges]
    curve = circuit(store, sid, edges=[50, 0, 3, n_edges, 10, n_edges // 2])
    assert curve["top_n"].to_list() == sizes and curve["circuit_id"].n_unique() == 1
    cid = int(curve["circuit_id"][0])
    recorded = store.query("SELECT top_n FROM circuits WHERE circuit_id = ?", [cid]).item()
    assert recorded == n_edges  # the largest size is the recorded circuit
    assert stored_curve(store, cid)["top_n"].to_list() == sizes
    for row in curve.iter_rows(named=True):
        alone = circuit(store, sid, edges=row["top_n"]).row(0, named=True)
        assert alone["n_edges"] == row["n_edges"]
        assert row["metric_value"] == pytest.approx(alone["metric_value"], abs=1e-5)
        assert row["faithfulness"] == pytest.approx(alone["faithfulness"], abs=1e-5)
    assert curve["faithfulness"][0] == pytest.approx(0.0, abs=1e-5)
    assert curve["faithfulness"][-1] == pytest.approx(1.0, abs=1e-5)
    again = circuit(store, sid, edges=sizes)  # any order is the same question
    assert again["circuit_id"].to_list() == [cid] * len(sizes)


def counting_reads(monkeypatch) -> list[str]:
    """Every array the queries read from the store, appended as it is read."""
    reads: list[str] = []
    tensor = Reader.tensor

    def counted(self, side, hook, *args, **kwargs):
        reads.append(f"{side}/{hook}")
        return tensor(self, side, hook, *args, **kwargs)

    monkeypatch.setattr(Reader, "tensor", counted)
    return reads


def test_faithfulness_search_reads_each_batch_once(setup, monkeypatch):
    from queries.attribution import evaluate

    store, _, _ = setup
    sid = int(attribute(store, 1, "eap")["score_id"][0])
    reads = counting_reads(monkeypatch)
    circuit(store, sid, edges=10, recompute=True)
    per_pass = len(reads)
    assert per_pass > 0
    reads.clear()
    found = circuit(store, sid, faithfulness=0.85, recompute=True)
    curve = stored_curve(store, int(found["circuit_id"][0]))
    assert curve.height >= 5  # doubling then bisection: many measurements, one read each
    assert 0 < len(reads) <= per_pass  # no more than one --edges pass (endpoints included)
    reads.clear()
    monkeypatch.setattr(evaluate, "KEEP_BYTES", 0)  # nothing kept: every step reads again
    again = circuit(store, sid, faithfulness=0.85, recompute=True)
    assert len(reads) > 3 * per_pass
    assert again["top_n"][0] == found["top_n"][0]
    assert stored_curve(store, int(again["circuit_id"][0])).equals(curve)  # today's numbers


def test_cli_curve_and_bad_lists_refused_before_compute(setup):
    store, _, _ = setup
    sid = str(attribute(store, 1, "eap")["score_id"][0])
    runner = CliRunner()
    res = runner.invoke(main, ["circuit", str(store.path), "--scores", sid, "--edges", "0,5,20",
                               "--format", "csv"])  # fmt: skip
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert len(lines) == 4 and [line.split(",")[2] for line in lines[1:]] == ["0", "5", "20"]
    n_edges = score_graph(store, int(sid))[1].n_edges
    res = runner.invoke(main, ["circuit", str(store.path), "--scores", sid, "--edges", "all,5",
                               "--format", "csv"])  # fmt: skip
    assert res.exit_code == 0, res.output
    rows = [line.split(",") for line in res.stdout.strip().splitlines()[1:]]
    assert [row[2] for row in rows] == ["5", str(n_edges)]
    same = circuit(store, int(sid), edges=[5, n_edges])  # "all" is the edge count's question
    assert same["circuit_id"][0] == int(rows[0][0])
    before = store.query("SELECT count(*) FROM queries").item()
    for edges, says in [("10,x", "comma-separated"), ("10,,20", "comma-separated"),
                        ("-1,5", "0 or more"), ("5,3,5", "listed twice"),
                        ("all,all", "listed twice"), (f"{n_edges},all", "same size"),
                        ("0,99999999", "the graph has")]:  # fmt: skip
        bad = runner.invoke(main, ["circuit", str(store.path), "--scores", sid, "--edges", edges])
        assert bad.exit_code == 2, (edges, bad.output)
        assert says in bad.output and len(bad.output.strip().splitlines()) == 1, bad.output
    assert store.query("SELECT count(*) FROM queries").item() == before


def test_exact_edge_effects_equal_one_hooked_forward_per_edge(setup):
    """Every edge patched alone by the engine's downstream-only batches equals one hooked
    TransformerLens forward per edge (tests/support/edge_reference.py), on two edges into every
    destination input."""
    store, adapter, data = setup
    sid = int(attribute(store, 1, "exact")["score_id"][0])
    _, graph, values = score_graph(store, sid)
    expected = hooked_edge_effects(adapter, data, sample_edges(graph))
    got = np.array([values[cell] for cell in expected])
    want = np.array(list(expected.values()))
    scale = np.abs(want).max()
    assert scale > 1e-3  # edges that matter, so agreement means something
    np.testing.assert_allclose(got, want, atol=min(1e-4, 1e-3 * scale), rtol=0)
    assert not values[~graph.real].any()


def test_exact_scores_of_some_sources_equal_their_rows_of_all(setup):
    """A sample of sources (what the benchmark times at large shapes) scores exactly their
    edges, as the whole graph's pass does, and nothing else."""
    from queries.attribution.edge_batches import edge_reader, read_batch
    from queries.attribution.edge_model import EdgeModel
    from queries.attribution.exact import exact_scores

    store, adapter, _ = setup
    model = EdgeModel(adapter)
    reader = edge_reader(store, store.run(1), model)
    batch = read_batch(reader, next(reader.spans()), model)
    every = exact_scores(model, batch, "logit-diff", 16).numpy()
    chosen = np.array([0, 7, 10])  # the input, a head and an MLP
    some = exact_scores(model, batch, "logit-diff", 16, sources=chosen).numpy()
    np.testing.assert_allclose(some[chosen], every[chosen], atol=1e-6, rtol=0)
    assert not np.delete(some, chosen, axis=0).any() and np.abs(every[chosen]).max() > 1e-3


def test_exact_scores_are_a_score_set_circuits_and_agreement_take(setup):
    store, _, _ = setup
    exact = attribute(store, 1, "exact")
    sid = int(exact["score_id"][0])
    eap = int(attribute(store, 1, "eap")["score_id"][0])
    assert set(exact["method"]) == {"exact"} and exact["dst"].null_count() == 0
    full = circuit(store, sid, edges=exact.height).row(0, named=True)
    assert full["faithfulness"] == pytest.approx(1.0, abs=1e-4)
    ids = [min(sid, eap), max(sid, eap)]
    pairs = store.query("SELECT * FROM score_pairs WHERE score_a = ? AND score_b = ?", ids)
    assert pairs.height == exact.height
    a, b = pairs["value_a"].to_numpy(), pairs["value_b"].to_numpy()
    row = store.query("SELECT * FROM score_agreement WHERE score_a = ? AND score_b = ?", ids).row(
        0, named=True
    )
    assert row["n_edges"] == exact.height
    assert row["pearson"] == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-9)
    from scipy.stats import spearmanr

    assert row["spearman"] == pytest.approx(spearmanr(a, b).statistic, abs=1e-9)
    ranked = {
        s: store.query("SELECT edge FROM top_edges WHERE score_id = ? AND rank <= 10", [s])[
            "edge"
        ].to_list()
        for s in (sid, eap)
    }
    assert row["top10_overlap"] == pytest.approx(len(set(ranked[sid]) & set(ranked[eap])) / 10)
    bad = CliRunner().invoke(main, ["attribute", str(store.path), "--run", "1", "--method",
                                    "exact", "--level", "node"])  # fmt: skip
    assert bad.exit_code == 2 and "--method exact" in bad.output
