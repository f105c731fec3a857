"""Answer sets and prob-diff: Greater-Than's sets in the catalog, version-1 catalogs migrated to
sets of one, and patching, attribution and faithfulness over sets against direct computations.

The direct metrics below loop over prompts with plain tensor indexing; they share no code with
actstore.model.metrics.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from edge_reference import hooked_circuit_metric, hooked_input_grads, node_outputs
from handbuilt import version_one_store
from patching_helpers import hooked_patching
from reading import read_hook
from test_attribution import run_tensors

from actstore.core.catalog import SCHEMA_VERSION
from actstore.core.store import Store
from actstore.model.adapter import load_model
from actstore.model.metrics import answer_arrays
from queries.attribution import attribute, circuit, score_graph, top_edges
from queries.patching import check_spec, compute_effects

N = 6


@pytest.fixture(scope="module")
def gt(tmp_path_factory):
    """(store, adapter, data): a Greater-Than run on toy-random (one template: equal lengths)."""
    from ingest.runner import ingest

    path = tmp_path_factory.mktemp("gt") / "store"
    ingest(Store(path, create=True), model="toy-random", task="greater-than", n=N, batch_size=4)
    store = Store(path)
    return store, load_model("toy-random"), run_tensors(store)


def direct(metric: str, final: torch.Tensor, data: dict) -> torch.Tensor:
    """Mean over prompts of prob-diff (Σ p(correct) − Σ p(incorrect)) or the set logit
    difference (mean logit of the correct set − of the incorrect set); final: (B, vocab)."""
    values = []
    for i in range(final.shape[0]):
        good, bad = data["correct"][i], data["incorrect"][i]
        if metric == "prob-diff":
            p = final[i].softmax(-1)
            values.append(sum(p[t] for t in good) - sum(p[t] for t in bad))
        else:
            mean_good = sum(final[i, t] for t in good) / len(good)
            values.append(mean_good - sum(final[i, t] for t in bad) / len(bad))
    return torch.stack(values).mean()


def full_sequence(metric: str):
    """The direct metric of full-sequence logits (B, seq, vocab), as TL's patching takes it."""

    def fn(logits: torch.Tensor, data: dict) -> torch.Tensor:
        return direct(metric, logits[torch.arange(logits.shape[0]), data["last"]], data)

    return fn


def test_greater_than_sets_are_years_above_and_at_or_below(gt):
    store, adapter, _ = gt
    prompts = store.prompts(1)
    assert prompts.height == N
    for row in prompts.iter_rows(named=True):
        yy = int(row["wrong_answer"])
        assert row["answers"] == [f"{y:02d}" for y in range(yy + 1, 100)]
        assert row["wrong_answers"] == [f"{y:02d}" for y in range(yy + 1)]
        assert row["answer"] in row["answers"] and row["wrong_answer"] in row["wrong_answers"]
        tokens = [adapter.token_ids(a)[0] for a in row["answers"]]
        assert row["answer_tokens"] == tokens
        assert len(row["answer_tokens"]) + len(row["wrong_answer_tokens"]) == 100


def test_prompt_figures_are_the_metric_the_queries_use(gt):
    """Ingest's per-prompt figures are the queries' metrics: `clean_logit_diff` is the mean
    logit of the correct set − of the incorrect set (the patch query's clean endpoint), not the
    difference of the two representative answers; `clean_prob` the representative answer's
    probability, as the `prob` metric."""
    store, model, data = gt
    prompts = store.prompts(1)
    rows = torch.arange(N)
    for side in ("clean", "corrupted"):
        final = model.hooked_logits(data[side])[rows, data["last"]].float()
        sets = [direct("logit-diff", final[i : i + 1], {k: data[k][i : i + 1]
                for k in ("correct", "incorrect")}) for i in range(N)]  # fmt: skip
        pair = final[rows, data["answer"]] - final[rows, data["wrong"]]
        got = torch.as_tensor(prompts[f"{side}_logit_diff"].to_numpy())
        assert torch.allclose(got, torch.stack(sets).double(), atol=1e-4)
        assert (got - pair.double()).abs().max() > 1e-3  # the sets, not the pair
        prob = final.softmax(-1)[rows, data["answer"]]
        assert torch.allclose(torch.as_tensor(prompts[f"{side}_prob"].to_numpy()), prob.double(),
                              atol=1e-5)  # fmt: skip


@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_the_prompt_figures_are_the_patch_querys_endpoints(gt, direction):
    """On Greater-Than the patch query's clean and corrupted ends are the means of the prompts'
    `clean_logit_diff` and `corrupted_logit_diff`: its normalized effects are measured between
    them (an end taken from the two representative answers would differ)."""
    store, model, data = gt
    spec = check_spec(store, 1, "head", "logit-diff", direction, 1, None)
    ours, _ = compute_effects(store, 1, spec, model)
    prompts = store.prompts(1)
    m_clean, m_corrupted = (
        prompts["clean_logit_diff"].mean(),
        prompts["corrupted_logit_diff"].mean(),
    )
    expected = (ours["value"].to_numpy() - m_corrupted) / (m_clean - m_corrupted)
    np.testing.assert_allclose(ours["normalized"].to_numpy(), expected, atol=1e-4, rtol=0)
    rows = torch.arange(N)
    pairs = {}
    for side in ("clean", "corrupted"):
        final = model.hooked_logits(data[side])[rows, data["last"]].float()
        pairs[side] = float(
            (final[rows, data["answer"]] - final[rows, data["wrong"]]).mean().detach()
        )
    by_pair = (ours["value"].to_numpy() - pairs["corrupted"]) / (
        pairs["clean"] - pairs["corrupted"]
    )
    assert np.abs(by_pair - expected).max() > 1e-2


@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("metric", ["prob-diff", "logit-diff"])
def test_patching_over_sets_matches_transformer_lens_with_a_direct_metric(gt, metric, direction):
    import pandas as pd

    store, model, data = gt
    src, base = ("clean", "corrupted") if direction == "denoise" else ("corrupted", "clean")
    _, cache = model.run_with_cache(data[src])
    s = model.shape
    index = pd.DataFrame(
        [(layer, h) for layer in range(s.n_layers) for h in range(s.n_heads)],
        columns=["layer", "head_index"],
    )
    fn = full_sequence(metric)
    expected = hooked_patching(
        model,
        "get_act_patch_attn_head_out_all_pos",
        data[base],
        cache,
        lambda logits: fn(logits, data),
        index_axis_names=None,
        index_df=index,
    )
    spec = check_spec(store, 1, "head", metric, direction, 1, None)
    ours, _ = compute_effects(store, 1, spec, model)
    np.testing.assert_allclose(
        ours.sort("layer", "head")["value"].to_numpy(), expected.numpy(), atol=1e-5, rtol=0
    )
    clean = direct(metric, read_hook(store, 1, "clean", "logits", model), data)
    corrupted = direct(metric, read_hook(store, 1, "corrupted", "logits", model), data)
    gap = float(clean - corrupted)
    normalized = (ours["value"].to_numpy() - float(corrupted)) / gap
    # a random model's clean − corrupted gap is small: compare in metric units
    np.testing.assert_allclose(ours["normalized"].to_numpy() * gap, normalized * gap, atol=2e-6)
    assert np.ptp(ours["value"].to_numpy()) > 0


def test_sets_of_one_reduce_to_the_single_answer_metrics():
    """A prompt with one answer and one wrong answer: prob-diff = p(answer) − p(wrong)."""
    import polars as pl

    from actstore.model.metrics import AnswerSets, Targets, from_logits

    logits = torch.randn(2, 3, 11)  # (variants, prompts, vocab)
    prompts = pl.DataFrame(
        {"answer_tokens": [[3], [5], [7]], "wrong_answer_tokens": [[1], [2], [0]]}
    )
    sets = AnswerSets.from_arrays(answer_arrays(prompts), 0, 3, "cpu")
    answer, wrong = torch.tensor([3, 5, 7]), torch.tensor([1, 2, 0])
    t = Targets(answer, wrong, logits[0], sets)
    rows = torch.arange(3)
    p = logits.softmax(-1)
    expected = p[:, rows, answer] - p[:, rows, wrong]
    torch.testing.assert_close(from_logits("prob-diff", logits, t), expected)
    diff = logits[:, rows, answer] - logits[:, rows, wrong]
    assert torch.equal(from_logits("logit-diff", logits, t), diff)  # bit for bit
    assert torch.equal(from_logits("logit-diff", logits, Targets(answer, wrong, logits[0])), diff)


def test_eap_over_prob_diff_equals_difference_times_hooked_gradient(gt):
    store, adapter, data = gt
    grads = hooked_input_grads(adapter, data["clean"], data, full_sequence("prob-diff"))
    diff = node_outputs(adapter, data["corrupted"]) - node_outputs(adapter, data["clean"])
    scores = attribute(store, 1, "eap", metric="prob-diff")
    query, graph, stored = score_graph(store, int(scores["score_id"][0]))
    assert query["params"]["metric"] == "prob-diff"
    expected = torch.einsum("bpsd,bpnd->sn", diff, grads).numpy() * graph.real
    scale = np.abs(expected).max()
    assert scale > 0
    np.testing.assert_allclose(stored, expected, atol=1e-5 * scale, rtol=0)


def test_faithfulness_over_prob_diff_equals_hooked_edge_patching(gt):
    store, adapter, data = gt
    sid = int(attribute(store, 1, "eap-ig", metric="prob-diff")["score_id"][0])
    _, graph, values = score_graph(store, sid)
    n = graph.n_edges // 5
    row = circuit(store, sid, edges=n, prune=False).row(0, named=True)
    assert row["metric"] == "prob-diff"
    clean = direct("prob-diff", read_hook(store, 1, "clean", "logits", adapter), data)
    corrupted = direct("prob-diff", read_hook(store, 1, "corrupted", "logits", adapter), data)
    assert row["clean_metric"] == pytest.approx(float(clean), abs=1e-6)
    assert row["corrupted_metric"] == pytest.approx(float(corrupted), abs=1e-6)
    mask = top_edges(graph, values, n, prune=False)
    expected = hooked_circuit_metric(adapter, data, mask, full_sequence("prob-diff"))
    assert row["metric_value"] == pytest.approx(expected, abs=1e-5)
    gap = float(clean - corrupted)  # small for a random model: compare in metric units
    assert row["faithfulness"] * gap == pytest.approx(expected - float(corrupted), abs=1e-5)


def test_version_one_catalog_migrates_to_sets_of_one(tmp_path):
    """A catalog written before answer sets migrates when a writing command first takes the
    writer lock (here: a query checking that it can record); every prompt's sets are then its
    answer and its wrong answer."""
    store = Store(version_one_store(tmp_path / "old"))
    store.check_writable()
    version = store.sql("select value from meta where key = 'schema_version'").item()
    assert version == str(SCHEMA_VERSION)
    assert "importance" in store.sql("select * from top_heads limit 0").columns
    prompts = store.prompts(1)
    assert prompts["answers"].to_list() == [["Mary"], ["are"]]
    assert prompts["wrong_answers"].to_list() == [["John"], ["is"]]
    arrays = answer_arrays(prompts)
    assert arrays["correct"].tolist() == [[7], [4]] and arrays["incorrect"].tolist() == [[9], [5]]
    assert arrays["correct_mask"].tolist() == [[1.0], [1.0]]
