"""Catalog views: the documented columns (docs/analysis.md), ranks and fraction ranks."""

from __future__ import annotations

import re
from pathlib import Path

import handbuilt
import pytest

from actstore.core.store import Store
from actstore.core.views import VIEWS
from queries.analysis import lookups as views

DOC = Path(__file__).resolve().parents[1] / "docs" / "analysis.md"


def documented_columns() -> dict[str, list[str]]:
    """Each `### view` section's table of columns, in order."""
    sections = re.split(r"^### ", DOC.read_text(), flags=re.M)[1:]
    out = {}
    for section in sections:
        name = section.split("\n", 1)[0].strip()
        rows = re.findall(r"^\| (\w+) \|", section, flags=re.M)
        out[name] = [r for r in rows if r != "column"]
    return out


@pytest.mark.parametrize("view", list(VIEWS))
def test_view_columns_are_documented(hand_store, view):
    store = Store(hand_store[0])
    assert store.query(f"SELECT * FROM {view} LIMIT 0").columns == documented_columns()[view]


def test_views_are_exported_names(hand_store):
    from actstore.core.store import table_names

    assert set(VIEWS) <= set(table_names(Store(hand_store[0])))


def test_views_recreated_idempotently(hand_store, tmp_path):
    import shutil

    copy = tmp_path / "store"
    shutil.copytree(hand_store[0], copy)
    store = Store(copy)
    before = store.query("SELECT * FROM top_heads ORDER BY query_id, rank")
    for _ in range(2):
        with store.writer():
            pass
    assert store.query("SELECT * FROM top_heads ORDER BY query_id, rank").equals(before)


def test_top_heads_rank_and_fraction(hand_store):
    path, ids = hand_store
    store = Store(path)
    top = views.top_heads(store, ids["patch1"], k=3)
    assert top["node"].to_list() == ["a0.h1", "a2.h3", "a1.h0"]
    assert top["normalized"].to_list() == [0.9, -0.8, 0.7]
    assert top["rank"].to_list() == [1, 2, 3] and set(top["n_heads"]) == {12}
    # 20% of 12 heads = 2.4: frac_rank < 0.2 keeps ceil(2.4) = 3 heads
    assert views.top_heads(store, ids["patch1"], frac=0.2).height == 3
    # a fraction smaller than one head still keeps the top head
    assert views.top_heads(store, ids["patch1"], frac=0.02)["node"].to_list() == ["a0.h1"]
    assert views.top_heads(store, ids["patch1"], frac=0.25).height == 3
    assert views.top_heads(store, ids["patch1"], frac=0.2501).height == 4


def test_known_head_ranks_first_in_both_directions(tmp_path):
    """Noising ranks by |1 − normalized|: the do-nothing heads (normalized ≈ 1) rank last, and
    the head that matters (a0.h1) ranks first as it does under denoising."""
    ids = handbuilt.build(tmp_path / "store")
    store = Store(tmp_path / "store")
    noise = handbuilt.record_noise(store, 1)
    denoised = views.top_heads(store, ids["patch1"], k=3)
    noised = views.top_heads(store, noise, k=3)
    assert denoised["node"].to_list() == noised["node"].to_list() == ["a0.h1", "a2.h3", "a1.h0"]
    assert noised["normalized"].to_list() == pytest.approx([0.1, 1.8, 0.3])
    assert noised["importance"].to_list() == pytest.approx([0.9, 0.8, 0.7])
    assert denoised["importance"].to_list() == pytest.approx([0.9, 0.8, 0.7])
    # ranked by |normalized| the noising query would put a head that does nothing first
    by_abs = store.query(
        "SELECT node FROM head_effects WHERE query_id = ? ORDER BY abs(normalized) DESC", [noise]
    )["node"].to_list()
    assert by_abs[0] == "a2.h3" and by_abs[1] not in ("a0.h1", "a1.h0")
    effects = store.query(
        "SELECT direction, importance, normalized FROM patch_effects WHERE query_id IN (?, ?)",
        [ids["patch1"], noise],
    )
    for direction, importance, norm in effects.rows():
        assert importance == pytest.approx(abs(norm) if direction == "denoise" else abs(1 - norm))


def test_head_effects_carry_provenance(hand_store):
    path, ids = hand_store
    row = (
        Store(path)
        .query("SELECT * FROM head_effects WHERE query_id = ? AND node = 'a2.h3'", [ids["patch2"]])
        .to_dicts()[0]
    )
    assert row["task"] == "colored-objects" and row["model"] == "hand"
    assert row["component"] == "head" and row["direction"] == "denoise"
    assert row["metric"] == "logit-diff" and row["corruption"] == "str"
    assert row["normalized"] == 0.95 and row["pos"] is None


def test_patch_effects_keep_position_rows(hand_store):
    path, ids = hand_store
    df = Store(path).query("SELECT * FROM patch_effects WHERE query_id = ?", [ids["resid1"]])
    assert df.height == 15 and df["component"].unique().to_list() == ["resid"]
    assert df["node"].null_count() == 15


def test_top_edges_ranked_by_importance(hand_store):
    path, ids = hand_store
    top = views.top_edges(Store(path), ids["scores2"], k=4)
    assert top["edge"].to_list() == [
        "a2.h3->logits",
        "a1.h0->a2.h3<v>",
        "m1->a2.h3<q>",
        "a2.h0->logits",
    ]
    assert top["score"].to_list() == [0.8, -0.7, 0.6, 0.55]
    assert top["importance"].to_list() == [0.8, 0.7, 0.6, 0.55]
    assert set(top["n_edges"]) == {10} and set(top["method"]) == {"eap-ig"}


def test_circuits_view(hand_store):
    path, ids = hand_store
    df = Store(path).query("SELECT * FROM circuits_v ORDER BY circuit_id")
    assert df["circuit_id"].to_list() == [ids["circuit1"], ids["circuit2"]]
    assert df["score_id"].to_list() == [ids["scores1"], ids["scores2"]]
    assert df["faithfulness"].to_list() == pytest.approx([0.9, 1.0])
    assert df["task"].to_list() == ["ioi", "colored-objects"]
    assert df["method"].to_list() == ["eap-ig", "eap-ig"]
    assert df["n_edges_stored"].to_list() == [4, 4]
    heads = (
        Store(path)
        .query(
            "SELECT node FROM circuit_heads WHERE circuit_id = ? ORDER BY node", [ids["circuit1"]]
        )["node"]
        .to_list()
    )
    # run 1's top-4 edges: a2.h3->logits, a1.h0->a2.h3<v>, m1->a2.h3<q>, a0.h1->m1
    assert heads == ["a0.h1", "a1.h0", "a2.h3"]
    assert df["n_heads"].to_list() == [3, 3]


def test_a_recomputed_query_supersedes_the_old_one(tmp_path):
    """The same setting asked again (`--recompute`) records a new query; the views and the
    report's tables show the newest per setting, and the older rows stay in their tables."""
    from actstore.core.results import record_query
    from queries.analysis.report import data

    path = tmp_path / "store"
    ids = handbuilt.build(path)
    store = Store(path)
    params = {"component": "head", "metric": "logit-diff", "direction": "denoise"}
    again = record_query(store, "patch", 1, params, 0.1, {"effects": handbuilt.head_effects(2)})
    attribute = {"method": "eap-ig", "steps": 5, "level": "edge", "metric": "logit-diff"}
    scores = record_query(store, "attribute", 1, attribute, 0.2,
                          {"edge_scores": handbuilt.edge_scores(2)})  # fmt: skip
    shown = set(store.query("SELECT DISTINCT query_id FROM patch_effects")["query_id"])
    assert again in shown and ids["patch1"] not in shown and ids["patch2"] in shown
    top = store.query("SELECT node FROM top_heads WHERE run_id = 1 AND component = 'head' "
                      "AND rank = 1")["node"].to_list()  # fmt: skip
    assert top == ["a2.h3"]  # run 2's planted top head, recorded again for run 1
    edges = set(store.query("SELECT DISTINCT score_id FROM top_edges")["score_id"])
    assert edges == {scores, ids["scores2"]}
    assert set(store.query("SELECT query_id FROM current_queries")["query_id"]).isdisjoint(
        {ids["patch1"], ids["scores1"]}
    )
    assert set(data.patch_queries(store, [1])["query_id"]) == {ids["resid1"], again}
    kept = store.query("SELECT count(*) AS n FROM effects WHERE query_id = ?", [ids["patch1"]])
    assert kept["n"].item() == handbuilt.N_LAYERS * handbuilt.N_HEADS
