"""Subspace patching over a store: the full basis equals full activation patching done by a
hooked full forward, DAS and mean-diff directions, the catalog rows, and input errors."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from patching_helpers import hooked_full_patch
from reading import read_hook

import actstore
from actstore.core.errors import UsageError
from actstore.core.store import Store
from actstore.model.adapter import load_model
from actstore.model.model_spec import builtin_names


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from ingest.runner import ingest

    path = tmp_path_factory.mktemp("subspace") / "store"
    store = Store(path, create=True)
    ingest(store, model="toy-random", task="ioi", n=12, batch_size=8, hooks="default,mlp_post")
    return actstore.open(path)


@pytest.mark.parametrize(
    "hook,head",
    [
        ("blocks.1.hook_resid_pre", None),
        ("blocks.2.hook_resid_mid", None),
        ("blocks.1.hook_resid_post", None),
        ("blocks.3.hook_resid_post", None),
        ("blocks.2.mlp.hook_post", None),
        ("blocks.3.attn.hook_z", 1),
        ("blocks.0.attn.hook_z", None),
    ],
)
def test_whole_space_equals_full_activation_patching(store, toy_random, tmp_path, hook, head):
    from queries.subspace.sites import parse_site

    dim = parse_site(toy_random, hook, head).dim
    np.save(tmp_path / "eye.npy", np.eye(dim))
    rows = store.subspace(1, hook, str(tmp_path / "eye.npy"), head=head)
    reference = hooked_full_patch(toy_random, store, hook, head)
    values = dict(zip(rows["component"], rows["value"], strict=True))
    assert values["v"] == pytest.approx(reference, abs=1e-5)
    assert values["full"] == pytest.approx(reference, abs=1e-5)
    assert rows["n_prompts"][0] == 12 and rows["split"][0] == "all"


def test_whole_space_at_roles_patches_each_prompts_own_positions(store, toy_random, tmp_path):
    """--pos IO,END: the whole space patched at each prompt's own IO and END positions equals a
    hooked full forward with the clean residual put in at exactly those positions."""
    import torch

    from actstore.core.roles import positions

    hook = "blocks.1.hook_resid_pre"
    np.save(tmp_path / "eye.npy", np.eye(toy_random.shape.d_model))
    rows = store.subspace(1, hook, str(tmp_path / "eye.npy"), pos="IO,END")
    at = torch.as_tensor(positions(store, 1, ["IO", "END"]))
    clean = read_hook(store, 1, "clean", hook, toy_random)
    prompts = store.prompts(1)
    tokens = torch.as_tensor(store.read(1, "corrupted", "tokens")).long()
    n = torch.arange(tokens.shape[0])[:, None]

    def put(act, hook):
        act = act.clone()
        act[n, at] = clean[n, at].to(act.dtype)
        return act

    with torch.no_grad():
        logits = toy_random.hooked_logits(tokens, [(hook, put)])
    final = logits[n[:, 0], torch.tensor(prompts["seq_len"].to_list()) - 1]
    answer = torch.tensor(prompts["answer_token"].to_list())
    wrong = torch.tensor(prompts["wrong_answer_token"].to_list())
    reference = float((final[n[:, 0], answer] - final[n[:, 0], wrong]).mean())
    values = dict(zip(rows["component"], rows["value"], strict=True))
    assert values["full"] == pytest.approx(reference, abs=1e-5)
    assert rows["pos"][0] == "IO,END"
    effect = store.sql("SELECT pos, role FROM effects ORDER BY query_id DESC LIMIT 1")
    assert effect.row(0) == (None, "IO,END")


def test_report_and_effect_are_in_the_catalog(store, tmp_path):
    v = np.random.default_rng(0).normal(size=256)
    np.save(tmp_path / "v.npy", v)
    rows = store.subspace(1, "blocks.2.mlp.hook_post", str(tmp_path / "v.npy"), pos="final",
                          metric="prob", direction="noise")  # fmt: skip
    qid = rows["query_id"][0]
    assert rows["component"].to_list() == ["v", "row", "null", "full"]
    # W_out maps 256 -> 64: a random direction is mostly (192/256) in its kernel.
    assert rows.filter(pl.col("component") == "null")["norm_sq"][0] == pytest.approx(0.75, abs=0.1)
    assert abs(rows.filter(pl.col("component") == "null")["effect"][0]) < 1e-4
    eff = store.query("SELECT * FROM effects WHERE query_id = ?", [qid])
    assert eff.height == 1 and eff["metric"][0] == "prob" and eff["pos"][0] == -1
    assert eff["value"][0] == pytest.approx(rows["value"][0])
    kind = store.query("SELECT kind, params FROM queries WHERE query_id = ?", [qid])
    assert kind["kind"][0] == "subspace" and "noise" in kind["params"][0]
    basis = np.array(store.query("SELECT vector FROM subspace_bases WHERE query_id = ?",
                                 [qid])["vector"].to_list()[0])  # fmt: skip
    assert np.allclose(basis, v / np.linalg.norm(v))
    again = store.subspace(1, "blocks.2.mlp.hook_post", str(tmp_path / "v.npy"), pos="final",
                           metric="prob", direction="noise")  # fmt: skip
    assert again["query_id"][0] == qid  # answered from the catalog


def test_parameters_are_recorded_under_their_option_names(store, tmp_path):
    """A subspace query records `basis` and `direction` (denoise|noise) as its options name
    them, and query_params reads them as typed columns."""
    np.save(tmp_path / "u.npy", np.random.default_rng(1).normal(size=64))
    rows = store.subspace(1, "blocks.1.hook_resid_post", str(tmp_path / "u.npy"), pos="final",
                          direction="noise", k=1)  # fmt: skip
    qid = rows["query_id"][0]
    recorded = json.loads(store.query("SELECT params FROM queries WHERE query_id = ?",
                                      [qid])["params"][0])  # fmt: skip
    assert "mode" not in recorded and "direction_sha256" not in recorded
    assert recorded["direction"] == "noise"
    assert recorded["basis"] == str((tmp_path / "u.npy").resolve())
    assert recorded["basis_sha256"] == hashlib.sha256((tmp_path / "u.npy").read_bytes()).hexdigest(
    )[:16]  # fmt: skip
    typed = store.query("SELECT * FROM query_params WHERE query_id = ?", [qid]).row(0, named=True)
    assert (typed["kind"], typed["direction"], typed["basis"], typed["hook"], typed["pos"]) == (
        "subspace",
        "noise",
        recorded["basis"],
        "blocks.1.hook_resid_post",
        "final",
    )
    assert typed["basis_sha256"] == recorded["basis_sha256"] and typed["metric"] == "logit-diff"


def test_queries_recorded_under_the_old_keys_still_read_and_answer(store, tmp_path):
    """Earlier versions recorded a subspace query's direction as `mode` and its basis as
    `direction`: such a row reads through query_params as a new one does, an equal query is
    answered from it, and a recomputed one supersedes it."""
    path = shutil.copytree(store.path, tmp_path / "old")
    old_store = actstore.open(path)
    np.save(tmp_path / "w.npy", np.random.default_rng(2).normal(size=64))
    ask = dict(run=1, hook="blocks.2.hook_resid_pre", basis=str(tmp_path / "w.npy"),
               pos="final", direction="noise", metric="prob")  # fmt: skip
    qid = old_store.subspace(**ask)["query_id"][0]
    new = json.loads(old_store.query("SELECT params FROM queries WHERE query_id = ?",
                                     [qid])["params"][0])  # fmt: skip
    old = {k: v for k, v in new.items() if k not in ("direction", "basis", "basis_sha256")}
    old.update(mode=new["direction"], direction=new["basis"], direction_sha256=new["basis_sha256"])
    # as the earlier version wrote the row: its JSON and its digest of kind, run and params
    blob = json.dumps({"kind": "subspace", "run_id": 1, "params": old}, sort_keys=True)
    digest = hashlib.sha256(blob.encode()).hexdigest()[:16]
    with old_store.writer(), old_store.catalog.write() as con:
        con.execute("UPDATE queries SET params = ?, params_hash = ? WHERE query_id = ?",
                    [json.dumps(old, sort_keys=True), digest, qid])  # fmt: skip
    typed = old_store.query("SELECT direction, basis, basis_sha256, metric FROM query_params "
                            "WHERE query_id = ?", [qid]).row(0, named=True)  # fmt: skip
    assert typed == {"direction": "noise", "basis": new["basis"],
                     "basis_sha256": new["basis_sha256"], "metric": "prob"}  # fmt: skip
    old_store.report(str(tmp_path / "report.html"), runs=[1])
    html = (tmp_path / "report.html").read_text()
    assert f"basis {new['basis']}, reader" in html and f"subspace query {qid} " in html
    n_queries = old_store.query("SELECT count(*) AS n FROM queries")["n"][0]
    assert old_store.subspace(**ask)["query_id"][0] == qid  # answered from the old row
    assert old_store.query("SELECT count(*) AS n FROM queries")["n"][0] == n_queries
    again = old_store.subspace(**ask, recompute=True)["query_id"][0]
    assert again > qid
    current = old_store.query("SELECT query_id FROM current_queries WHERE kind = 'subspace' "
                              "AND query_id IN (?, ?)", [qid, again])  # fmt: skip
    assert current["query_id"].to_list() == [again]


def _site_map(hook: str, reader: str | None) -> np.ndarray:
    """The reading map of a hook (toy-random): (dim, out)."""
    from queries.core.engine import Engine
    from queries.subspace.sites import parse_site, reading_map

    model = load_model("toy-random")
    return reading_map(Engine.from_adapter(model), parse_site(model, hook, None), reader).numpy()


@pytest.mark.cover(1)
@pytest.mark.parametrize(
    "hook, reader",
    [("blocks.2.mlp.hook_post", None), ("blocks.2.hook_resid_mid", "unembed")],
)
@pytest.mark.parametrize("part", ["row", "null"])
def test_direction_wholly_in_one_part_reports_the_other_absent(store, tmp_path, hook, reader,
                                                               part):  # fmt: skip
    """The clean − corrupted mean difference of the hook projected onto the rowspace (or the
    kernel) of the map that reads it: the other part is round-off, reported with norm 0 and
    effect 0 and never patched; the present part patches exactly what v does."""
    w = _site_map(hook, reader)
    u, s, _ = np.linalg.svd(w, full_matrices=False)
    q = u[:, s > 1e-6 * s[0]]  # the rowspace of a -> a @ w
    acts = {side: read_hook(store, 1, side, hook)[:, -1].numpy().astype(np.float64)
            for side in ("clean", "corrupted")}  # fmt: skip
    diff = (acts["clean"] - acts["corrupted"]).mean(0)
    v = q @ (q.T @ diff) if part == "row" else diff - q @ (q.T @ diff)
    np.save(tmp_path / "v.npy", v)
    rows = store.subspace(1, hook, str(tmp_path / "v.npy"), pos="final", reader=reader)
    by = {r["component"]: r for r in rows.iter_rows(named=True)}
    other = "null" if part == "row" else "row"
    assert (by[other]["dim"], by[other]["norm_sq"], by[other]["effect"]) == (0, 0.0, 0.0)
    assert by[other]["variance"] == 0.0
    assert by[part]["norm_sq"] == 1.0 and by[part]["dim"] == 1
    assert by[part]["value"] == pytest.approx(by["v"]["value"], abs=1e-6)
    if part == "row":
        assert by["v"]["effect"] != 0.0
    else:
        assert abs(by["v"]["effect"]) < 1e-4  # the kernel cannot move the output
        assert by["v"]["illusion"] is False
    stored = store.query(
        "SELECT component, dim, norm_sq, effect FROM subspace_reports WHERE query_id = ? "
        "AND component = ?",
        [rows["query_id"][0], other],
    ).row(0)
    assert stored == (other, 0, 0.0, 0.0)


def test_das_and_mean_diff_fit_on_train_and_report_held_out(store, tmp_path, capsys):
    hook = "blocks.3.hook_resid_mid"
    das = store.subspace(1, hook, "das", pos="final", epochs=10, seed=0,
                         save_basis=str(tmp_path / "das.npy"))  # fmt: skip
    first, last = map(float, capsys.readouterr().err.split("DAS loss ")[1].split(" -> "))
    assert last < first  # the training objective improved (random weights: no held-out claim)
    assert das["split"][0] == "held-out" and das["n_prompts"][0] == 6
    assert np.load(tmp_path / "das.npy").shape == (1, 64)
    md = store.subspace(1, hook, "mean-diff", pos="final", seed=0, reader="unembed")
    assert md["component"].to_list()[:2] == ["v", "row"] and md["illusion"][0] is not None
    by_order = store.subspace(1, hook, "mean-diff", group_by="grp", pos="final")
    assert by_order["dim"][0] == 1 and by_order["n_prompts"][0] == 6


def flipped_ioi(path, model, n: int) -> None:
    """IOI pairs whose corrupted prompt repeats the other name (S2 := IO), as an AutoCircuit
    file: both prompts hold the same two names, only which one is repeated flips, so the
    answer flips (the binary positional signal that name movers read, Wang et al.)."""
    import json

    from ingest.tasks import get_task

    prompts = []
    for p in get_task("ioi").generate(n, 3, model):
        io, s = p.meta["io"], p.meta["s"]
        verb = " gave" if f" {s} gave" in p.clean else " handed"
        head, tail = p.clean.rsplit(f" {s}{verb}", 1)
        prompts.append({"clean": p.clean, "corrupt": f"{head} {io}{verb}{tail}",
                        "answers": [p.answer], "wrong_answers": [p.wrong_answer]})  # fmt: skip
    path.write_text(json.dumps({"prompts": prompts}))


@pytest.mark.slow
@pytest.mark.parametrize("name", [n for n in ("toy",) if n in builtin_names()])
def test_das_recovers_half_of_full_patching_on_trained_toy(tmp_path, name):
    """Acceptance: on IOI (S2-flipped pairs), a 4-d DAS subspace (of d_model 64) of the
    final-position residual stream entering layer 2, which the toy's name movers read to choose
    the name to copy, moves the held-out logit difference by at least half of what patching the
    full activation does. (A 1-d direction recovers 0.14-0.21 of it on this model.)"""
    from actstore.model.model_spec import BUILTIN_DIR

    if not (BUILTIN_DIR / name / "model.safetensors").exists():
        pytest.skip(f"{name}: trained weights are not in this checkout (they land from 'tasks')")
    from ingest.runner import ingest

    flipped_ioi(tmp_path / "ioi.json", load_model(name), 64)
    store = Store(tmp_path / "s", create=True)
    ingest(store, model=name, dataset=str(tmp_path / "ioi.json"), batch_size=16)
    s = actstore.open(tmp_path / "s")
    rows = s.subspace(1, "blocks.1.hook_resid_post", "das", pos="final", epochs=40, seed=0, k=4)
    eff = dict(zip(rows["component"], rows["effect"], strict=True))
    assert rows["split"][0] == "held-out"
    assert eff["full"] > 0.3
    assert eff["v"] >= 0.5 * eff["full"]
    qid = rows["query_id"][0]
    assert s.query("SELECT count(*) AS n FROM subspace_reports WHERE query_id = ?", [qid])["n"][0]
    assert s.query("SELECT count(*) AS n FROM effects WHERE query_id = ?", [qid])["n"][0] == 1


def test_bad_inputs_are_one_line_usage_errors(store, tmp_path):
    np.save(tmp_path / "bad.npy", np.ones(7))
    cases = [
        (dict(hook="blocks.9.hook_resid_pre", basis="das"), "layers 0..3"),
        (dict(hook="blocks.1.attn.hook_q", basis="das"), "give blocks.L.hook_resid_pre"),
        (dict(hook="blocks.1.hook_resid_pre", basis=str(tmp_path / "bad.npy")), "(64,)"),
        (dict(hook="blocks.1.hook_resid_pre", basis="nope.npy"), "no such file"),
        (dict(hook="blocks.1.hook_resid_pre", basis="das", head=1), "--head applies"),
        (dict(hook="blocks.1.hook_resid_pre", basis="das", pos="9"), "give roles: IO, S1"),
        (dict(hook="blocks.1.hook_resid_pre", basis="das", pos="IO,XX"), "no role 'XX'"),
        (dict(hook="blocks.1.hook_resid_pre", basis="das", metric="accuracy"), "gradient"),
        (dict(hook="blocks.2.hook_resid_post", basis="das", reader="1.0.q"), "downstream"),
        (dict(hook="blocks.2.hook_resid_pre", basis="das", metric="acc"), "--metric"),
        (dict(hook="blocks.2.hook_resid_pre", basis="das", direction="das"), "--direction das"),
    ]
    for kwargs, message in cases:
        with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
            store.subspace(1, **kwargs)


def test_an_older_catalog_keeps_its_subspace_rows_under_the_new_names(store, tmp_path):
    """Schema 12 named the report's denoise/noise column `direction` (once `mode`) and the table
    of patched vectors `subspace_bases` (once `subspace_directions`): a store recorded before
    answers its query read-only as it is, and once migrated under the new names, rows kept."""
    import duckdb
    from older import as_version

    path = shutil.copytree(store.path, tmp_path / "old")
    np.save(tmp_path / "x.npy", np.random.default_rng(3).normal(size=64))
    ask = dict(run=1, hook="blocks.1.hook_resid_post", basis=str(tmp_path / "x.npy"),
               pos="final", direction="noise")  # fmt: skip
    first = actstore.open(path).subspace(**ask, save_basis=str(tmp_path / "new.npy"))
    as_version(path, 11)
    con = duckdb.connect(str(path / "catalog.duckdb"), read_only=True)
    qid = int(first["query_id"][0])
    mine = "WHERE query_id = ?"
    assert con.execute(f"SELECT mode FROM subspace_reports {mine}", [qid]).fetchall() == [
        ("noise",)
    ] * len(first)
    assert con.execute(f"SELECT count(*) FROM subspace_directions {mine}", [qid]).fetchall() == [
        (1,)
    ]
    con.close()
    path.chmod(0o555)
    (path / "catalog.duckdb").chmod(0o444)
    try:  # read-only: the cached query reads the older names
        cached = actstore.open(path).subspace(**ask, save_basis=str(tmp_path / "old.npy"))
    finally:
        path.chmod(0o755)
        (path / "catalog.duckdb").chmod(0o644)
    assert cached.equals(first) and cached["direction"].to_list() == ["noise"] * len(first)
    assert np.array_equal(np.load(tmp_path / "old.npy"), np.load(tmp_path / "new.npy"))
    old = actstore.open(path)
    with old.writer():  # migrates
        pass
    reports = old.query(f"SELECT direction FROM subspace_reports {mine}", [qid])
    assert reports["direction"].to_list() == ["noise"] * len(first)
    assert old.query(f"SELECT count(*) AS n FROM subspace_bases {mine}", [qid])["n"].item() == 1
    assert old.subspace(**ask).equals(first)


def test_save_basis_replaces_the_file_whole(store, tmp_path, monkeypatch):
    """--save-basis writes as every output does: a write that fails part way leaves the file
    that was there, whole, and no partial file beside it."""
    from actstore.core.errors import ActstoreError

    np.save(tmp_path / "y.npy", np.random.default_rng(4).normal(size=64))
    ask = dict(run=1, hook="blocks.1.hook_resid_post", basis=str(tmp_path / "y.npy"),
               pos="final")  # fmt: skip
    out = tmp_path / "basis.npy"
    store.subspace(**ask, save_basis=str(out))
    before = out.read_bytes()
    assert np.load(out).shape == (1, 64)

    def disk_full(file, values, *args, **kwargs):
        handle = open(file, "wb") if isinstance(file, (str, Path)) else file  # noqa: SIM115
        handle.write(before[:20])
        handle.flush()
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(np, "save", disk_full)
    with pytest.raises(ActstoreError, match=r"^cannot write .*basis\.npy: No space left on device"):
        store.subspace(**ask, save_basis=str(out))
    assert out.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["basis.npy", "y.npy"]
