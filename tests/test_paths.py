"""Path patching (`actstore path`), checked against TransformerLens 4.3's direct path patching and
independent hooked forwards through the bridge."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner
from edge_reference import data_of, logit_diff, node_outputs
from older import as_version
from paths_check import assert_fast_is_exact

from actstore.app.cli import main
from actstore.core.store import Store
from actstore.model.adapter import load_model
from queries.attribution import Graph, attribute, score_graph
from queries.paths import path


@pytest.fixture(scope="module", params=["toy-random", pytest.param("toy", marks=pytest.mark.slow)])
def run(request, tmp_path_factory):
    """(store, adapter, data) of an IOI run of 8 prompts (several lengths) on each toy model
    (toy-random's attention is near uniform, so q and k paths move its metric by ~1e-5; the
    trained toy's by far more)."""
    from ingest.runner import ingest

    where = tmp_path_factory.mktemp("paths") / "store"
    ingest(Store(where, create=True), model=request.param, task="ioi", n=8, batch_size=4)
    store = Store(where)
    data = data_of(store)
    return store, load_model(request.param), data


def _metric(adapter, data, tokens, hooks=()) -> float:
    with torch.no_grad():
        logits = adapter.hooked_logits(tokens, list(hooks), split_inputs=True)
    return float(logit_diff(logits, data))


@pytest.mark.parametrize("letter", ["q", "k", "v"])
def test_one_receiver_per_row_equals_transformer_lens_direct_path(run, letter):
    import transformer_lens.patching as tlp

    store, adapter, data = run
    rows = path(store, 1, "a0.h1", f"a*.*:{letter}")
    assert rows.height == 3 * 4 and set(rows["qkv"]) == {letter}
    _, clean_cache = adapter.run_with_cache(data["clean"])
    _, corrupted_cache = adapter.run_with_cache(data["corrupted"])
    rows_i = torch.arange(len(data["last"]))

    def metric(logits):
        final = logits[rows_i, data["last"]]
        return (final[rows_i, data["answer"]] - final[rows_i, data["wrong"]]).mean()

    with torch.no_grad():
        tl = tlp.get_act_patch_direct_path(
            adapter.bridge, data["corrupted"], clean_cache, corrupted_cache, metric, 0, 1, letter,
            verbose=False,
        )  # fmt: skip
    got = {r["receiver"]: r["value"] for r in rows.iter_rows(named=True)}
    want = {f"a{la}.h{h}": float(tl[la, h]) for la in range(1, 4) for h in range(4)}
    assert got.keys() == want.keys()
    names = list(want)
    got_v, want_v = np.array([got[n] for n in names]), np.array([want[n] for n in names])
    np.testing.assert_allclose(got_v, want_v, atol=1e-4, rtol=0)
    # the change each path makes agrees to a thousandth of the largest one, or to float32's
    # resolution of the metric (1e-7) where they are all tiny (toy-random's q and k paths)
    base = _metric(adapter, data, data["corrupted"])
    moved = np.abs(want_v - base).max()
    assert moved > 1e-6
    np.testing.assert_allclose(got_v - base, want_v - base, atol=max(1e-3 * moved, 1e-7), rtol=0)


def test_noising_one_edge_is_its_exact_edge_effect(run):
    """With one receiver, noising is the clean run with that edge corrupted: the exact score."""
    store, _, _ = run
    _, graph, exact = score_graph(store, int(attribute(store, 1, "exact")["score_id"][0]))
    rows = path(store, 1, "all", "a3.h2:k,m2,logits", direction="noise")
    clean = float(store.prompts(1)["clean_logit_diff"].mean())
    assert rows.height == 15 + 14 + 20  # the senders each receiver reads
    for r in rows.iter_rows(named=True):
        f, b = graph.cell_of(r["sender"], r["receiver"], r["qkv"])
        assert r["value"] - clean == pytest.approx(exact[f, b], abs=1e-4)


def test_receivers_joined_by_plus_are_pinned_together(run):
    """Two receivers in different layers patched together: each reads the base run's input plus
    the sender's change (Wang et al.'s frozen run), everything else computes freely."""
    store, adapter, data = run
    row = path(store, 1, "a0.h1", "a1.h0:q+a3.h2:v").row(0, named=True)
    assert row["receiver"] == "a1.h0+a3.h2" and row["qkv"] is None
    g = Graph.of(adapter.architecture)
    delta = (node_outputs(adapter, data["clean"]) - node_outputs(adapter, data["corrupted"]))[
        :, :, g.head_index(0, 1)
    ]
    with torch.no_grad():
        _, base = adapter.run_with_cache(data["corrupted"])

    def pin(layer: int, head: int):
        def fn(act, hook):
            act = act.clone()
            act[:, :, head] = base[f"blocks.{layer}.hook_resid_pre"] + delta
            return act

        return fn

    hooks = [("blocks.1.hook_q_input", pin(1, 0)), ("blocks.3.hook_v_input", pin(3, 2))]
    assert row["value"] == pytest.approx(_metric(adapter, data, data["corrupted"], hooks), abs=1e-4)
    alone = path(store, 1, "a0.h1", "a1.h0:q").row(0, named=True)["value"]
    assert abs(row["value"] - alone) > 1e-6  # the second receiver is patched too


def test_positions_restrict_the_sender_to_a_role(run):
    store, adapter, data = run
    from actstore.core.roles import positions

    rows = path(store, 1, "a0.h1,m1", "a2.h0:q", positions=["S2", "END"])
    assert rows.height == 4 and set(rows["role"]) == {"S2", "END"}
    at = positions(store, 1, ["S2"])[:, 0]
    g = Graph.of(adapter.architecture)
    delta = node_outputs(adapter, data["clean"]) - node_outputs(adapter, data["corrupted"])
    mask = torch.zeros(delta.shape[:2])
    mask[torch.arange(len(at)), torch.as_tensor(at)] = 1.0
    for sender, f in (("a0.h1", g.head_index(0, 1)), ("m1", g.mlp_index(1))):

        def add(act, hook, f=f):
            act = act.clone()
            act[:, :, 0] += delta[:, :, f] * mask[..., None]
            return act

        want = _metric(adapter, data, data["corrupted"], [("blocks.2.hook_q_input", add)])
        got = rows.filter((rows["sender"] == sender) & (rows["role"] == "S2"))["value"].item()
        assert got == pytest.approx(want, abs=1e-4)
    # into the logits only the final position counts: END alone is every position
    end = path(store, 1, "all", "logits", positions=["END"]).sort("sender")
    every = path(store, 1, "all", "logits").sort("sender")
    np.testing.assert_allclose(end["value"].to_numpy(), every["value"].to_numpy(), atol=1e-6)


def test_name_mover_search_ranks_senders(run):
    store, _, _ = run
    rows = path(store, 1, "all", "logits", positions=["END"])
    assert rows.height == 4 * 5 and rows["rank"].to_list() == list(range(1, 21))
    top = store.query("SELECT * FROM top_senders WHERE query_id = ? ORDER BY rank",
                      [int(rows["query_id"][0])])  # fmt: skip
    assert top["sender"].to_list() == rows["sender"].to_list()
    assert (np.diff(top["importance"].to_numpy()) <= 0).all()


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--senders", "a0.h7", "--receivers", "logits"], "no head 7"),
        (["--senders", "a9.h0", "--receivers", "logits"], "no layer 9"),
        (["--senders", "a2.h0", "--receivers", "a1.h0:q"], "comes before sender a2.h0"),
        (["--senders", "m2", "--receivers", "m2"], "comes before sender m2"),
        (["--senders", "a0.h0", "--receivers", "a1.h0:x"], "--receivers a1.h0:x"),
        (["--senders", "a0.h0", "--receivers", "logits", "--positions", "XX"], "XX"),
    ],
)
def test_bad_specs_are_refused_in_one_line_before_any_compute(run, args, expect):
    store, _, _ = run
    before = store.query("SELECT count(*) AS n FROM queries")["n"].item()
    res = CliRunner().invoke(main, ["path", str(store.path), "--run", "1", *args])
    assert res.exit_code == 2, res.output
    assert expect in res.output and len(res.output.strip().splitlines()) == 1
    assert store.query("SELECT count(*) AS n FROM queries")["n"].item() == before


def test_cli_prints_rows_and_repeats_from_the_store(run):
    store, _, _ = run
    args = ["path", str(store.path), "--run", "1", "--senders", "a0.*", "--receivers", "a1.*:q",
            "--format", "csv"]  # fmt: skip
    res = CliRunner().invoke(main, args)
    assert res.exit_code == 0, res.output
    lines = res.stdout.strip().splitlines()
    assert lines[0].startswith("query_id,sender,receiver,qkv,role,metric,value,normalized")
    assert len(lines) == 1 + 16
    again = CliRunner().invoke(main, args)
    assert again.stdout == res.stdout


# ---- attention interventions ------------------------------------------------------------


def hooked_intervention(adapter, data, heads, attend, at, weight) -> torch.Tensor:
    """Final-position logits of the clean run with each chosen head's hook_pattern row at `at`
    set to (1 − w)·own + w·one-hot(attend), by the bridge's own forward."""
    rows = torch.arange(len(at))

    def edit(heads_of):
        def fn(pattern, hook):
            pattern = pattern.clone()
            for h in heads_of:
                own = pattern[rows, h, at]
                one_hot = torch.zeros_like(own)
                one_hot[rows, attend] = 1.0
                pattern[rows, h, at] = (1 - weight) * own + weight * one_hot
            return pattern

        return fn

    layers = sorted({la for la, _ in heads})
    hooks = [(f"blocks.{la}.attn.hook_pattern", edit([h for l2, h in heads if l2 == la]))
             for la in layers]  # fmt: skip
    with torch.no_grad():
        logits = adapter.hooked_logits(data["clean"], hooks)
    return logits[rows, data["last"]]


@pytest.mark.parametrize("weight", [1.0, 0.4])
def test_intervention_equals_a_hook_pattern_edit(run, weight):
    from actstore.core.roles import positions
    from queries.paths.intervene import intervene

    store, adapter, data = run
    rows = intervene(store, 1, "a1.h2,a3.h0,a3.h3", attend="IO", weight=weight)
    assert rows.height == 1 + 8 and rows["prompt_idx"][0] is None
    where = positions(store, 1, ["IO", "END"])
    final = hooked_intervention(adapter, data, [(1, 2), (3, 0), (3, 3)],
                                torch.as_tensor(where[:, 0]), torch.as_tensor(where[:, 1]),
                                weight)  # fmt: skip
    i = torch.arange(8)
    diff = (final[i, data["answer"]] - final[i, data["wrong"]]).numpy()
    per = rows.filter(rows["prompt_idx"].is_not_null()).sort("prompt_idx")
    np.testing.assert_allclose(per["value_after"].to_numpy(), diff, atol=1e-4)
    clean = store.prompts(1)["clean_logit_diff"].to_numpy()
    np.testing.assert_allclose(per["value_before"].to_numpy(), clean, atol=1e-4)
    assert np.abs(diff - clean).max() > 1e-3  # the edit changes the output
    np.testing.assert_array_equal(per["accuracy_after"].to_numpy(), (diff > 0).astype(float))
    np.testing.assert_array_equal(per["accuracy_before"].to_numpy(), (clean > 0).astype(float))
    total = rows.row(0, named=True)
    assert total["value_after"] == pytest.approx(float(diff.mean()), abs=1e-4)
    assert total["accuracy_after"] == pytest.approx(float((diff > 0).mean()))


@pytest.mark.parametrize(
    ("args", "expect"),
    [
        (["--heads", "a1.h9", "--attend", "IO"], "no head 9"),
        (["--heads", "a1.h0", "--attend", "NOPE"], "NOPE"),
        (["--heads", "a1.h0", "--attend", "END", "--at", "IO"], "comes after --at IO"),
        (["--heads", "a1.h0", "--attend", "IO", "--weight", "1.5"], "--weight 1.5"),
    ],
)
def test_bad_interventions_are_refused_before_any_compute(run, args, expect):
    store, _, _ = run
    before = store.query("SELECT count(*) AS n FROM queries")["n"].item()
    res = CliRunner().invoke(main, ["intervene", str(store.path), "--run", "1", *args])
    assert res.exit_code == 2, res.output
    assert expect in res.output and len(res.output.strip().splitlines()) == 1
    assert store.query("SELECT count(*) AS n FROM queries")["n"].item() == before


def test_a_catalog_of_the_previous_schema_answers_a_new_query(run, tmp_path):
    """An uncached query migrates an older catalog before it records (no write inside the
    lookup's read)."""
    import shutil

    from actstore.core.catalog import SCHEMA_VERSION

    store, _, _ = run
    old = shutil.copytree(store.path, tmp_path / "old")
    as_version(old, SCHEMA_VERSION - 1)
    rows = path(Store(old), 1, "m2", "logits", direction="noise")
    assert rows.height == 1
    version = Store(old).query("SELECT value FROM meta WHERE key = 'schema_version'").item()
    assert version == str(SCHEMA_VERSION)


@pytest.mark.parametrize("roles", [["S2", "END", "IO"], None], ids=["roles", "every-position"])
@pytest.mark.parametrize("direction", ["denoise", "noise"])
def test_fast_recompute_equals_the_plain_one(run, direction, roles):
    """Senders restricted to roles recompute only from each role's earliest position, and
    unrestricted ones from the first position where the clean and corrupted tokens differ,
    attending over the base run's keys and values before it; the first receivers' layer is
    computed once for the base run and the last layer at the final positions only: the same as
    recomputing every variant at every position."""
    store, _, _ = run
    assert_fast_is_exact(
        store, "a0.h1,m0,a1.*", "a*.*:q,a2.h1:k,a3.h0:v,m2,a2.h0:q+a3.h3:k,logits", roles,
        direction,
    )  # fmt: skip


def test_first_receivers_mlp_from_their_heads_is_exact(run, monkeypatch):
    """Where the first receivers' layer changes heads' q, k or v only, each variant's MLP input
    projections come from those heads' z (`Engine.mlp_of_heads`): used, and equal to the plain
    recompute, in both directions."""
    from queries.core.engine import Engine

    calls = []
    real = Engine.mlp_of_heads

    def counted(self, *args):
        calls.append(args[0])
        return real(self, *args)

    monkeypatch.setattr(Engine, "mlp_of_heads", counted)
    store, _, _ = run
    for direction in ("denoise", "noise"):
        assert_fast_is_exact(store, "a0.h1,a1.h2", "a*.*:q,a3.h0:v,a2.h1:k", None, direction)
    assert {1, 2} <= set(calls)  # the last layer (final positions only) may not pay


def test_unrestricted_senders_start_where_the_inputs_first_differ(run, tmp_path):
    """The tail starts at the first position where some prompt's clean and corrupted tokens
    differ (IOI's ABC names); under gaussian noising, where the tokens are equal, at the first
    noised subject token, read from the stored noised embeddings. Both runs' fast paths equal
    their plain recompute."""
    from ingest.runner import ingest
    from queries.core.engine import Engine
    from queries.core.reader import Reader
    from queries.paths.compute import _first_change

    store, adapter, data = run
    noised = Store(tmp_path / "noised", create=True)
    ingest(noised, model=adapter, task="ioi", n=8, batch_size=4, corruption="gaussian")
    for s, differs in ((store, data["clean"] != data["corrupted"]), (noised, None)):
        e = Engine.from_adapter(adapter)
        reader = Reader(s, 1, adapter.device, e)
        firsts = [_first_change(e, reader, span) for span in reader.spans()]
        if differs is not None:
            want = [int(differs[sp.lo : sp.hi].any(0).nonzero()[0]) for sp in reader.spans()]
            assert firsts == want
        assert min(firsts) > 0
        assert_fast_is_exact(s, "a0.h1,m0", "a*.*:q,a3.h0:v,m2,logits", None, "denoise")


@pytest.mark.slow
def test_bad_specs_are_refused_before_torch_is_imported(run):
    """Unknown heads and layers, a receiver before its sender, unknown roles: refused from the
    catalog alone, in a process that never imports torch (nor loads the model)."""
    import json
    import subprocess
    import sys

    store, _, _ = run
    cases = [
        ["path", "--senders", "a0.h7", "--receivers", "logits"],
        ["path", "--senders", "a0.h0", "--receivers", "a1.h9:q"],
        ["path", "--senders", "a0.h0", "--receivers", "a9.*:k"],
        ["path", "--senders", "a2.h0", "--receivers", "a1.h0:v"],
        ["path", "--senders", "a0.h0", "--receivers", "logits", "--positions", "NOPE"],
        ["intervene", "--heads", "a1.h9", "--attend", "IO"],
        ["intervene", "--heads", "a1.h0", "--attend", "END", "--at", "IO"],
    ]
    code = (
        "import json, sys\n"
        "from click.testing import CliRunner\n"
        "from actstore.app.cli import main\n"
        "out = []\n"
        "for verb, *args in json.loads(sys.argv[1]):\n"
        "    r = CliRunner().invoke(main, [verb, sys.argv[2], '--run', '1', *args])\n"
        "    lines = len(r.output.strip().splitlines())\n"
        "    out.append([r.exit_code, lines, 'torch' in sys.modules])\n"
        "print(json.dumps(out))\n"
    )
    res = subprocess.run([sys.executable, "-c", code, json.dumps(cases), str(store.path)],
                         capture_output=True, text=True)  # fmt: skip
    assert json.loads(res.stdout) == [[2, 1, False]] * len(cases), res.stderr
