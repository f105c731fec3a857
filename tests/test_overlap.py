"""Overlap statistics on hand-built effect tables against hand-computed values, the CLI, errors,
and invariants over random sets (hypothesis)."""

from __future__ import annotations

import csv
import io
import itertools
import json
import math

import duckdb
import handbuilt
import polars as pl
import pytest
from click.testing import CliRunner
from hypothesis import given, settings
from hypothesis import strategies as st
from scipy.stats import hypergeom

import actstore
from actstore.app.cli import main
from actstore.core.errors import UsageError
from actstore.core.results import record_query
from actstore.core.store import Store
from queries.analysis import overlap as ov


def exact_p(k: int, n: int, a: int, b: int) -> float:
    """P(X ≥ k), X ~ Hypergeometric(N = n, |A| = a, draws |B| = b), by counting."""
    top = sum(math.comb(a, x) * math.comb(n - a, b - x) for x in range(k, min(a, b) + 1))
    return top / math.comb(n, b)


def pair(df: pl.DataFrame, a: int, b: int) -> dict:
    return df.filter(pl.col("run_a") == a, pl.col("run_b") == b).to_dicts()[0]


def test_top3_heads_hand_computed(hand_store):
    path, ids = hand_store
    df = ov.overlap(Store(path), [1, 2], ov.choose(top_k=3))
    assert df.height == 4
    row = pair(df, 1, 2)
    # A = {a0.h1, a2.h3, a1.h0}, B = {a2.h3, a0.h1, a2.h0}, N = 3 layers x 4 heads
    assert (row["n_a"], row["n_b"], row["intersection"], row["union_size"]) == (3, 3, 2, 4)
    assert row["iou"] == 0.5 and row["frac_of_a"] == pytest.approx(2 / 3)
    assert row["universe"] == 12 and row["expected"] == pytest.approx(9 / 12)
    assert (row["source_a"], row["source_b"]) == (ids["patch1"], ids["patch2"])
    # P(X >= 2) = (C(3,2) C(9,1) + C(3,3) C(9,0)) / C(12,3) = 28 / 220
    assert row["p_value"] == pytest.approx(28 / 220, rel=1e-12)
    assert row["p_value"] == pytest.approx(hypergeom.sf(1, 12, 3, 3), rel=1e-12)
    assert row["p_value"] == pytest.approx(exact_p(2, 12, 3, 3), rel=1e-12)
    diag = pair(df, 1, 1)
    assert diag["iou"] == 1.0 and diag["p_value"] == pytest.approx(1 / 220)


def test_uneven_sets_directional(hand_store):
    path, _ = hand_store
    # top-4 of run 1 adds a2.h2 (0.01 * 10/12, the largest remainder); top 2 of run 2
    df = ov.overlap(Store(path), None, ov.choose(top_k=2), queries=[1, 2])
    row = pair(df, 1, 2)
    assert (row["intersection"], row["iou"], row["frac_of_a"]) == (2, 1.0, 1.0)
    store = Store(path)
    a = set(store.query("SELECT node FROM top_heads WHERE query_id = 1 AND rank <= 5")["node"])
    b = set(store.query("SELECT node FROM top_heads WHERE query_id = 2 AND rank <= 2")["node"])
    k, union = len(a & b), len(a | b)
    members = """
        SELECT set_idx, node FROM (
            SELECT 0 AS set_idx, node FROM top_heads WHERE query_id = 1 AND rank <= 5
            UNION ALL SELECT 1, node FROM top_heads WHERE query_id = 2 AND rank <= 2)
    """
    assert store.query(f"SELECT count(*) FROM ({members})").item() == 7
    sel_a = ov.Selection(top_k=5)
    five = pair(ov.overlap(store, None, sel_a, queries=[1, 2]), 1, 2)
    assert five["n_a"] == 5 and five["intersection"] == len(
        a & set(store.query("SELECT node FROM top_heads WHERE query_id = 2 AND rank <= 5")["node"])
    )
    assert k == 2 and union == 5
    assert (k / len(a), k / len(b)) == (0.4, 1.0)


def test_top_fraction_edges_and_circuits(hand_store):
    path, ids = hand_store
    store = Store(path)
    # top 40% of 10 edges = 4 edges each; they share 3 (a2.h3->logits, a1.h0->a2.h3<v>, m1->..)
    for selection in (ov.choose(by="edge", top_frac=0.4), ov.choose(by="edge", circuits=True)):
        row = pair(ov.overlap(store, [1, 2], selection), 1, 2)
        assert (row["n_a"], row["intersection"], row["union_size"]) == (4, 3, 5)
        assert row["iou"] == 0.6 and row["universe"] == 10
        assert row["p_value"] == pytest.approx(exact_p(3, 10, 4, 4), rel=1e-12)
    heads = pair(ov.overlap(store, [1, 2], ov.choose(by="head", circuits=True)), 1, 2)
    # circuit heads: run 1 {a0.h1, a1.h0, a2.h3}, run 2 {a1.h0, a2.h3, a2.h0}
    assert (heads["n_a"], heads["n_b"], heads["intersection"]) == (3, 3, 2)
    assert heads["source_a"] == ids["circuit1"] and heads["universe"] == 12


@pytest.mark.parametrize(
    "runs, selection, message",
    [
        ([1, 3], ov.choose(top_k=3), "run 3 has no head patching query; run actstore patch"),
        ([1, 3], ov.choose(by="edge", top_k=3), "run 3 has no edge attribution scores"),
        ([1, 3], ov.choose(circuits=True), "run 3 has no circuit"),
        ([1, 9], ov.choose(top_k=3), "run 9 is not in"),
        ([1], ov.choose(top_k=3), "at least two runs"),
        ([1, 1], ov.choose(top_k=3), "each run may appear once"),
        ([1, 4], ov.choose(top_k=3), "different numbers of heads"),
    ],
)
def test_overlap_errors(hand_store, runs, selection, message):
    with pytest.raises(UsageError, match=message):
        ov.overlap(Store(hand_store[0]), runs, selection)


def test_bad_selections():
    for kwargs in ({"top_k": 2, "top_frac": 0.1}, {"top_k": 0}, {"top_frac": 1.5}, {"by": "x"}):
        with pytest.raises(UsageError):
            ov.choose(**kwargs)
    assert ov.choose().top_frac == 0.02


def test_default_sets_have_a_floor_and_say_k_and_the_universe(hand_store):
    """2% of the hand model's 12 heads is one head, whose IoU is 0 or 1 by chance: the default
    takes at least 4 heads (the top 4 here), and the CLI states k and the universe."""
    path, _ = hand_store
    store = Store(path)
    default = ov.overlap(store, [1, 2], ov.choose())
    top4 = ov.overlap(store, [1, 2], ov.choose(top_k=4))
    assert default.drop("setting").equals(top4.drop("setting"))
    assert pair(default, 1, 2)["n_a"] == 4 and pair(default, 1, 2)["universe"] == 12
    assert ov.choose().describe() == "top 2% of heads (at least 4)"
    assert ov.choose(by="edge").floor == 20 and ov.choose(top_frac=0.02).floor is None
    res = CliRunner().invoke(main, ["overlap", str(path), "--runs", "1,2"])
    assert res.exit_code == 0, res.output
    assert "; top 2% of heads (at least 4): sets of k = 4 heads of 12" in res.stderr
    assert "warning" not in res.stderr
    # an explicit fraction is taken as given, and its one-head sets are flagged
    res = CliRunner().invoke(main, ["overlap", str(path), "--runs", "1,2", "--top-frac", "0.02"])
    assert res.exit_code == 0, res.output
    assert "sets of k = 1 heads of 12" in res.stderr
    assert "warning: sets of fewer than 3 heads (run 1 has 1, run 2 has 1)" in res.stderr


def test_filter_by_metric_names_the_fix(hand_store):
    with pytest.raises(UsageError, match="--component head --metric prob"):
        ov.overlap(Store(hand_store[0]), [1, 2], ov.choose(top_k=3), metric="prob")


@pytest.fixture
def mixed_store(tmp_path):
    """The hand store plus KL noising head queries: run 1 (query noise1), then run 2."""
    ids = handbuilt.build(tmp_path / "store")
    store = Store(tmp_path / "store")
    ids["noise1"] = handbuilt.record_noise(store, 1)
    return store, ids


def test_like_with_like_picks_the_common_setting(mixed_store):
    """Run 1's newest head query is KL noising, run 2 has only logit-diff denoising: the one
    setting both have is used, not each run's newest query."""
    store, ids = mixed_store
    df = ov.overlap(store, [1, 2], ov.choose(top_k=3))
    row = pair(df, 1, 2)
    assert (row["source_a"], row["source_b"]) == (ids["patch1"], ids["patch2"])
    assert row["intersection"] == 2
    assert set(df["setting"]) == {
        "patch queries with component head, metric logit-diff, direction denoise, window 1, "
        "corruption str"
    }


def test_like_with_like_refuses_a_mismatch_in_one_line(mixed_store):
    store, ids = mixed_store
    with pytest.raises(UsageError) as exc:
        ov.overlap(store, [1, 2], ov.choose(top_k=3), metric="kl")
    assert str(exc.value) == (
        f"run 2 has no head patching query with metric kl; run actstore patch {store.path} "
        "--run 2 --component head --metric kl"
    )
    with pytest.raises(UsageError) as exc:
        ov.overlap(store, None, ov.choose(top_k=3), queries=[ids["noise1"], ids["patch2"]])
    message = str(exc.value)
    assert "\n" not in message
    assert message.startswith(
        f"patch query {ids['noise1']} (run 1) and patch query {ids['patch2']} (run 2) differ in "
        "metric (kl vs logit-diff)"
    )
    noise2 = handbuilt.record_noise(store, 2)
    with pytest.raises(UsageError, match="share patch queries under 2 settings .* choose one with "
                       "--metric/--direction/--window or give --queries"):  # fmt: skip
        ov.overlap(store, [1, 2], ov.choose(top_k=3))
    # naming the setting, or the queries, resolves it; noising ranks by importance
    noise = ov.overlap(store, [1, 2], ov.choose(top_k=3), direction="noise")
    assert pair(noise, 1, 2)["source_b"] == noise2 and pair(noise, 1, 2)["intersection"] == 2
    given = ov.overlap(store, None, ov.choose(top_k=3), queries=[ids["noise1"], noise2])
    assert given.equals(noise)


def test_like_with_like_corruption_and_window(mixed_store):
    store, ids = mixed_store
    with store.writer(), store.catalog.write() as con:
        con.execute("UPDATE runs SET corruption = 'gaussian' WHERE run_id = 2")
    with pytest.raises(UsageError, match=r"the runs differ in corruption \(run 1: str, run 2: "
                       r"gaussian\)"):  # fmt: skip
        ov.overlap(store, None, ov.choose(top_k=3), queries=[ids["patch1"], ids["patch2"]])
    with pytest.raises(UsageError, match="--window applies to head sets from patching"):
        ov.overlap(store, [1, 2], ov.choose(by="edge", top_k=3), window=2)


def test_a_window_sweep_is_drawn_from_its_full_windows(mixed_store):
    """Window 2 over 3 layers scores starts 0 and 1 only: the universe is those 8 heads, not the
    model's 12, so the p-value is not made smaller by heads no set could contain."""
    store, ids = mixed_store
    params = {"component": "head", "metric": "logit-diff", "direction": "denoise", "window": 2}
    for run in (1, 2):
        effects = handbuilt.head_effects(run).filter(pl.col("layer") < 2)
        ids[f"window{run}"] = record_query(store, "patch", run, params, 0.1, {"effects": effects})
    row = pair(ov.overlap(store, [1, 2], ov.choose(top_k=3), window=2), 1, 2)
    assert (row["source_a"], row["source_b"]) == (ids["window1"], ids["window2"])
    assert row["universe"] == 8 and row["expected"] == pytest.approx(9 / 8)
    k = row["intersection"]
    assert row["p_value"] == pytest.approx(exact_p(k, 8, 3, 3), rel=1e-12)
    whole = pair(ov.overlap(store, [1, 2], ov.choose(top_k=3), window=1), 1, 2)
    assert whole["universe"] == 12 and whole["source_a"] == ids["patch1"]


def test_a_sweep_over_some_layers_is_never_compared(mixed_store):
    """A head query restricted to some layers (`layers=`) ranks only those layers' heads: the
    run's newest query, yet not chosen; named explicitly, refused in one line."""
    store, ids = mixed_store
    effects = handbuilt.head_effects(1).filter(pl.col("layer") == 2)
    params = {"component": "head", "metric": "logit-diff", "direction": "denoise", "window": 1,
              "layers": [2]}  # fmt: skip
    some = record_query(store, "patch", 1, params, 0.1, {"effects": effects})
    row = pair(ov.overlap(store, [1, 2], ov.choose(top_k=3)), 1, 2)
    assert (row["source_a"], row["source_b"]) == (ids["patch1"], ids["patch2"])
    with pytest.raises(UsageError) as exc:
        ov.overlap(store, None, ov.choose(top_k=3), queries=[some, ids["patch2"]])
    assert str(exc.value) == (
        f"--queries: query {some} patched layers 2 only, and overlap compares head sets over "
        "every layer; give a sweep over all layers"
    )


@pytest.mark.parametrize(
    "queries, runs, message",
    [
        ([5, 6], None, "--queries: 5 is not a head patching query"),
        ([1, 2], [2, 1], "--queries 1,2 belong to runs 1,2, not --runs 2,1"),
        ([1], None, "at least two ids"),
    ],
)
def test_explicit_queries_are_checked(hand_store, queries, runs, message):
    with pytest.raises(UsageError, match=message):
        ov.overlap(Store(hand_store[0]), runs, ov.choose(top_k=3), queries=queries)


def test_cli_prints_what_it_compared(hand_store):
    path, ids = hand_store
    res = CliRunner().invoke(
        main, ["overlap", str(path), "--queries", f"{ids['scores1']},{ids['scores2']}", "--by",
               "edge", "--top-k", "4", "--format", "csv"],
    )  # fmt: skip
    assert res.exit_code == 0, res.output
    assert (
        f"compared score sets with method eap-ig, metric logit-diff, steps 5, corruption str: "
        f"run 1 score set {ids['scores1']}, run 2 score set {ids['scores2']}"
    ) in res.stderr
    rows = list(csv.DictReader(io.StringIO(res.stdout)))
    assert [r["source_a"] for r in rows] == [str(ids["scores1"])] * 2 + [str(ids["scores2"])] * 2
    assert {r["setting"] for r in rows} == {
        "score sets with method eap-ig, metric logit-diff, steps 5, corruption str"
    }


def test_cli_overlap(hand_store):
    path, _ = hand_store
    res = CliRunner().invoke(
        main, ["overlap", str(path), "--runs", "1,2", "--top-k", "3", "--format", "json"]
    )
    assert res.exit_code == 0, res.output
    rows = json.loads(res.stdout)
    assert (
        res.stderr == "compared patch queries with component head, metric logit-diff, "
        "direction denoise, window 1, corruption str: run 1 patch query 1, run 2 patch query 2; "
        "top 3 heads: sets of k = 3 heads of 12\n"
    )
    assert [(r["run_a"], r["run_b"], r["intersection"]) for r in rows] == [
        (1, 1, 3), (1, 2, 2), (2, 1, 2), (2, 2, 3),
    ]  # fmt: skip
    assert actstore.open(str(path)).overlap([1, 2], top_k=3).to_dicts() == rows


def test_cli_overlap_error_is_one_line(hand_store):
    res = CliRunner().invoke(main, ["overlap", str(hand_store[0]), "--runs", "1,3"])
    assert res.exit_code == 2
    assert res.output.strip() == (
        f"error: run 3 has no head patching query; run actstore patch {hand_store[0]} "
        "--run 3 --component head"
    )
    res = CliRunner().invoke(main, ["overlap", str(hand_store[0]), "--runs", "1,x"])
    assert res.exit_code == 2 and "comma-separated integer ids" in res.output


# ---- invariants over random sets ----------------------------------------------------------

N_LAYERS, N_HEADS = 3, 4
HEADS = [(layer, head) for layer in range(N_LAYERS) for head in range(N_HEADS)]


def pairs_of(sets: list[set[int]], universe: int = 12) -> pl.DataFrame:
    """The overlap SQL (PAIRS_SQL) on explicit sets in an in-memory DuckDB, p-values added."""
    con = duckdb.connect()
    con.execute("CREATE TABLE sets (set_idx INT, run_id INT, source_id INT, task VARCHAR, "
                "universe BIGINT)")  # fmt: skip
    con.execute("CREATE TABLE members (set_idx INT, item VARCHAR)")
    for i, members in enumerate(sets):
        con.execute("INSERT INTO sets VALUES (?, ?, ?, 'task', ?)", [i, i + 1, i + 1, universe])
        for m in members:
            con.execute("INSERT INTO members VALUES (?, ?)", [i, f"h{m}"])
    df = con.sql(f"WITH {ov.PAIRS_SQL}").pl()
    return ov.with_p_values(df.drop("universe_b").rename({"universe_a": "universe"}))


head_sets = st.sets(st.integers(0, 11), min_size=1, max_size=12)


@settings(max_examples=40, deadline=None)
@given(a=head_sets, b=head_sets, c=head_sets)
def test_overlap_invariants(a, b, c):
    df = pairs_of([a, b, c])
    assert df.height == 9
    for (i, x), (j, y) in itertools.product(enumerate([a, b, c], 1), repeat=2):
        xy, yx = pair(df, i, j), pair(df, j, i)
        assert (xy["n_a"], xy["n_b"]) == (len(x), len(y))
        assert xy["intersection"] == len(x & y) and xy["union_size"] == len(x | y)
        assert xy["iou"] == yx["iou"] == pytest.approx(len(x & y) / len(x | y))
        assert 0.0 <= xy["iou"] <= 1.0 and 0.0 <= xy["p_value"] <= 1.0
        assert (xy["iou"] == 1.0) == (x == y)
        assert xy["p_value"] == pytest.approx(yx["p_value"], rel=1e-12)
        assert (xy["frac_of_a"], xy["frac_of_b"]) == (yx["frac_of_b"], yx["frac_of_a"])
        assert xy["frac_of_a"] == pytest.approx(len(x & y) / len(x))
        assert xy["p_value"] == pytest.approx(exact_p(len(x & y), 12, len(x), len(y)), rel=1e-9)


@settings(max_examples=30, deadline=None)
@given(a=head_sets, b=head_sets, extra=st.integers(0, 11))
def test_sharing_more_lowers_p_and_raises_iou(a, b, extra):
    """Moving B's item toward A (B gains a shared item, loses an unshared one) never raises p."""
    outside = sorted(b - a)
    if extra in b or extra not in a or not outside:
        return
    moved = (b - {outside[0]}) | {extra}
    before, after = pair(pairs_of([a, b]), 1, 2), pair(pairs_of([a, moved]), 1, 2)
    assert after["intersection"] == before["intersection"] + 1
    assert after["p_value"] <= before["p_value"] + 1e-12
    assert after["iou"] > before["iou"]


def test_empty_sets_have_no_iou():
    df = pairs_of([set(), {1}])
    row = pair(df, 1, 2)
    assert row["iou"] == 0.0 and row["frac_of_a"] is None and row["p_value"] == 1.0
    assert pair(df, 1, 1)["iou"] is None


@settings(max_examples=60, deadline=None)
@given(
    n=st.integers(1, 200),
    data=st.data(),
)
def test_p_value_monotone_and_exact(n, data):
    a = data.draw(st.integers(0, n))
    b = data.draw(st.integers(0, n))
    lo, hi = max(0, a + b - n), min(a, b)
    ks = list(range(lo, hi + 1))
    frame = pl.DataFrame({"intersection": ks, "universe": [n] * len(ks), "n_a": [a] * len(ks),
                          "n_b": [b] * len(ks)})  # fmt: skip
    p = ov.with_p_values(frame)["p_value"].to_list()
    assert all(0.0 <= x <= 1.0 for x in p)
    assert p[0] == pytest.approx(1.0)
    assert all(x >= y - 1e-12 for x, y in zip(p, p[1:], strict=False))
    for k, x in zip(ks, p, strict=True):
        assert x == pytest.approx(exact_p(k, n, a, b), rel=1e-9, abs=1e-300)
