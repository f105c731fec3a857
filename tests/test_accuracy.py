"""`--metric accuracy`: the share of prompts whose correct answer (set) scores above the incorrect
one, for patching and circuits; attribution refuses it (it has no gradient)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from actstore.core.errors import UsageError
from actstore.core.roles import positions
from actstore.core.store import Store
from actstore.model.metrics import AnswerSets, Targets, from_logits


def test_accuracy_compares_the_sets_probability_mass():
    logits = torch.tensor([[2.0, 1.0, 0.0, 1.5], [0.0, 0.0, 3.0, 0.0], [1.0, 1.0, 1.0, 1.0]])
    sets = AnswerSets(
        correct=torch.tensor([[0, 1], [0, 1], [0, 0]]),
        correct_mask=torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]]),
        incorrect=torch.tensor([[2, 3], [2, 3], [1, 1]]),
        incorrect_mask=torch.tensor([[1.0, 1.0], [1.0, 1.0], [1.0, 0.0]]),
    )
    t = Targets(sets.correct[:, 0], sets.incorrect[:, 0], logits, sets)
    # e^2 + e^1 > e^0 + e^1.5; e^0 + e^0 < e^3 + e^0; a tie is not above
    assert from_logits("accuracy", logits, t).tolist() == [1.0, 0.0, 0.0]


def _hooked_accuracy(model, store, hooks) -> float:
    prompts = store.prompts(1)
    tokens = torch.as_tensor(store.read(1, "corrupted", "tokens")).long()
    with torch.no_grad():
        logits = model.hooked_logits(tokens, hooks)
    rows = torch.arange(tokens.shape[0])
    final = logits[rows, torch.tensor(prompts["seq_len"].to_list()) - 1]
    answer = torch.tensor(prompts["answer_token"].to_list())
    wrong = torch.tensor(prompts["wrong_answer_token"].to_list())
    return float((final[rows, answer] > final[rows, wrong]).double().mean())


def test_patching_by_accuracy(ioi_store, toy_random):
    """Each row is the share of patched prompts answered right, as a hooked forward counts it;
    the ends are the stored runs' shares (clean_logit_diff > 0, corrupted_logit_diff > 0)."""
    from reading import read_hook

    from queries.patching import check_spec, compute_effects

    store = Store(ioi_store)
    spec = check_spec(store, 1, "resid", "accuracy", "denoise", 1, "IO,END")
    ours = compute_effects(store, 1, spec, toy_random)[0]
    prompts = store.prompts(1)
    clean = float((prompts["clean_logit_diff"] > 0).mean())
    corrupted = float((prompts["corrupted_logit_diff"] > 0).mean())
    assert clean != corrupted
    n = prompts.height
    assert set((ours["value"] * n).round(6).to_list()) <= {float(k) for k in range(n + 1)}
    normalized = (ours["value"] - corrupted) / (clean - corrupted)
    np.testing.assert_allclose(ours["normalized"].to_numpy(), normalized.to_numpy(), atol=1e-9)
    at = torch.as_tensor(positions(store, 1, ["IO", "END"]))
    rows = torch.arange(n)
    for layer in range(toy_random.shape.n_layers):
        name = f"blocks.{layer}.hook_resid_pre"
        source = read_hook(store, 1, "clean", name, toy_random)
        for j, role in enumerate(["IO", "END"]):

            def put(act, hook, j=j, source=source):
                act = act.clone()
                act[rows, at[:, j]] = source[rows, at[:, j]].to(act.dtype)
                return act

            want = _hooked_accuracy(toy_random, store, [(name, put)])
            got = ours.filter((ours["layer"] == layer) & (ours["role"] == role))["value"].item()
            assert got == pytest.approx(want, abs=1e-9), (layer, role)


def test_attribution_refuses_accuracy_in_one_line(ioi_store):
    from queries.attribution.attribute import resolve_params

    with pytest.raises(UsageError) as err:
        resolve_params("eap", None, None, "accuracy")
    assert str(err.value).startswith(
        "--metric accuracy: attribution follows the metric's gradient and accuracy has none"
    )
    assert "\n" not in str(err.value)


def test_circuit_faithfulness_in_accuracy(ioi_copy):
    """The whole graph is the model (faithfulness 1), the empty circuit the corrupted run (0),
    both measured as shares of prompts answered right; the score set's own metric is untouched."""
    from queries.attribution import attribute, circuit, score_graph

    store = Store(ioi_copy)
    scores = int(attribute(store, 1, "eap")["score_id"][0])
    n_edges = score_graph(store, scores)[1].n_edges
    full = circuit(store, scores, edges=n_edges, metric="accuracy", prune=False)
    prompts = store.prompts(1)
    row = full.row(0, named=True)
    assert row["metric"] == "accuracy"
    assert row["clean_metric"] == pytest.approx(float((prompts["clean_logit_diff"] > 0).mean()))
    assert row["corrupted_metric"] == pytest.approx(
        float((prompts["corrupted_logit_diff"] > 0).mean())
    )
    assert row["faithfulness"] == pytest.approx(1.0)
    empty = circuit(store, scores, edges=0, metric="accuracy")
    assert empty.row(0, named=True)["faithfulness"] == pytest.approx(0.0)
    default = circuit(store, scores, edges=0)
    assert default.row(0, named=True)["metric"] == "logit-diff"
