"""Token roles: every task names its positions as the model's input holds them (BOS = 0), dataset
files may carry them, ingest records them as `prompt_roles` rows (part of the run's parameters),
and `actstore.core.roles` reads them back; stores from before roles read as END only."""

from __future__ import annotations

import csv
import json
import re
import shutil
from pathlib import Path

import duckdb
import numpy as np
import polars as pl
import pytest
from older import as_version
from tokenizers_for_tests import bpe_view, toy_view

from actstore.core.errors import UsageError
from actstore.core.roles import END, positions, role_names, run_roles
from actstore.core.store import Store
from ingest.batches import params_hash
from ingest.datasets import load_dataset
from ingest.prompts import role_positions
from ingest.tasks import TASKS, get_task

VIEWS = {"toy": toy_view, "bpe": bpe_view}
ROLES = {name: list(task.roles) for name, task in TASKS.items()}
# The roles each task must have, the ones the seed papers describe it by, as the tasks call them
# (SVA's verb is predicted at END; Colored Objects' other colours are OTHER1 and OTHER2).
NAMED = {
    "ioi": {"IO", "S1", "S1+1", "S2", END},
    "colored-objects": {"OBJECT", "COLOR", "OTHER1", "OTHER2", END},
    "greater-than": {"YY", END},
    "sva": {"SUBJECT", END},
    "capital-country": {"COUNTRY", END},
}
README = Path(__file__).resolve().parents[1] / "README.md"


def _input(view, text: str) -> list[int]:
    """The model's input: BOS, then the text's tokens."""
    return [0, *view.token_ids(text)]


def _last_token(view, word: str) -> int:
    """The last token of `word` where it follows a space in the prompt (BPE: " word")."""
    ids = view.token_ids(word if view is toy_view() else " " + word)
    return ids[-1]


@pytest.mark.parametrize("view", sorted(VIEWS))
@pytest.mark.parametrize("name", sorted(ROLES))
def test_task_roles_are_the_tokens_they_name(name, view):
    model = VIEWS[view]()
    for p in get_task(name).generate(40, seed=3, model=model):
        ids = _input(model, p.clean)
        at = role_positions(model, p, len(ids))
        assert list(at) == ROLES[name]
        assert at[END] == len(ids) - 1
        token = {r: ids[pos] for r, pos in at.items()}
        meta = p.meta
        if name == "ioi":
            assert token["IO"] == model.token_ids(p.answer)[0]
            assert token["S1"] == token["S2"] == model.token_ids(p.wrong_answer)[0]
            assert at["S1+1"] == at["S1"] + 1 and at["S1"] < at["S2"] and at["IO"] < at["S2"]
            assert (at["IO"] < at["S1"]) == (meta["order"] == "ABBA")
        elif name == "colored-objects":
            assert token["COLOR"] == model.token_ids(p.answer)[0]
            others = {token["OTHER1"], token["OTHER2"]}
            assert model.token_ids(p.wrong_answer)[0] in others
            assert token["COLOR"] not in others and at["OTHER1"] < at["OTHER2"]
            assert token["OBJECT"] == token["QUERY"] == _last_token(model, meta["object"])
            assert at["OBJECT"] < at["QUERY"] and (at["QUERY"] == at[END]) == (view == "toy")
        elif name == "greater-than":
            assert token["YY"] == model.token_ids(p.wrong_answer)[0]  # the start year's "32"
            assert at["YY"] == at["XX"] + 1
        elif name == "sva":
            subject = p.subject_words[0]
            assert token["SUBJECT"] == _last_token(model, subject)
            assert token["ATTRACTOR"] == _last_token(model, meta["attractor"])
            assert at["SUBJECT"] < at["ATTRACTOR"]
        else:
            assert token["COUNTRY"] == _last_token(model, meta["country"])


def test_the_readme_table_is_every_tasks_roles():
    """The README's table of roles is each built-in task's `roles`, in order, meanings
    included; every task has the roles NAMED lists, END last."""
    rows = re.findall(r"^\| `([a-z-]+)` \| `([^`]+)` \| (.+?) \|$", README.read_text(), re.M)
    table: dict[str, dict[str, str]] = {}
    for task, role, meaning in rows:
        table.setdefault(task, {})[role] = meaning
    assert table == {name: task.roles for name, task in TASKS.items()}
    for name, task in TASKS.items():
        assert NAMED[name] <= set(task.roles) and list(task.roles)[-1] == END, name


def test_a_multi_token_word_is_its_last_token():
    """GPT-2-style BPE splits words outside its pool; the role is the word's last piece."""
    from ingest.tasks.base import PromptPair, RoleSpan

    model = bpe_view()
    text = "The capital of Zqxw is"
    pieces = model.token_ids(" Zqxw")
    assert len(pieces) > 1
    pair = PromptPair(text, text, " Paris", " Rome", roles=(RoleSpan("COUNTRY", 15, 19),))
    ids = _input(model, text)
    at = role_positions(model, pair, len(ids))
    assert at["COUNTRY"] == 3 + len(pieces)  # BOS, The, capital, of, then the pieces
    assert ids[at["COUNTRY"]] == pieces[-1]


def _csv(path, rows):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["clean", "corrupted", "answer", "wrong_answer", "roles"])
        w.writerows(rows)
    return path


def test_dataset_files_carry_roles_as_positions_or_words(tmp_path):
    model = toy_view()
    pairs = get_task("ioi").generate(3, 0, model)
    rows = []
    for p in pairs:
        at = role_positions(model, p, len(_input(model, p.clean)))
        spec = {"IO": p.meta["io"], "S1": at["S1"], "S2": at["S2"]}  # a word, and positions
        rows.append((p.clean, p.corrupted, p.answer, p.wrong_answer, json.dumps(spec)))
    rows.append((pairs[0].clean, pairs[0].corrupted, pairs[0].answer, pairs[0].wrong_answer, ""))
    loaded = load_dataset(_csv(tmp_path / "ioi.csv", rows), model)
    for p, got in zip(pairs, loaded, strict=False):
        want = role_positions(model, p, len(_input(model, p.clean)))
        have = role_positions(model, got, len(_input(model, got.clean)))
        assert have == {r: want[r] for r in ("IO", "S1", "S2", END)}
    assert role_positions(model, loaded[3], 5) == {END: 4}  # an empty cell: END only
    prompts = [
        {"clean": p.clean, "corrupt": p.corrupted, "answers": [p.answer],
         "wrong_answers": [p.wrong_answer], "roles": {"IO": p.meta["io"]}}
        for p in pairs
    ]  # fmt: skip
    path = tmp_path / "ioi.json"
    path.write_text(json.dumps({"prompts": prompts}))
    for p, got in zip(pairs, load_dataset(path, model), strict=True):
        have = role_positions(model, got, len(_input(model, got.clean)))
        assert have["IO"] == role_positions(model, p, len(_input(model, p.clean)))["IO"]


@pytest.mark.parametrize(
    ("roles", "expect"),
    [
        ("[1, 2]", "roles must be a JSON object"),
        ("{not json", "roles must be a JSON object"),
        ('{"IO": "Zed"}', "'Zed', which is not a word of the clean prompt"),
        ('{"7": 3}', "role name '7' must be non-empty text, not a number"),
        ('{"IO": 2.5}', "give a token position"),
        ('{"IO": true}', "give a token position"),
        ('{"IO": -1}', "position -1 is not a token position"),
    ],
)
def test_malformed_roles_name_the_row(tmp_path, roles, expect):
    p = get_task("ioi").generate(1, 0, toy_view())[0]
    path = _csv(tmp_path / "bad.csv", [(p.clean, p.corrupted, p.answer, p.wrong_answer, roles)])
    with pytest.raises(UsageError, match="row 1") as err:
        load_dataset(path, toy_view())
    assert expect in str(err.value)


@pytest.mark.parametrize(
    ("roles", "expect"),
    [
        ('{"IO": 99}', "role IO is at position 99, outside the prompt's 16 tokens"),
        ('{"END": 3}', "role END is the final token (15)"),
    ],
)
def test_roles_outside_the_prompt_are_refused(tmp_path, roles, expect, toy_random):
    from ingest.prompts import prepare

    p = get_task("ioi").generate(1, 0, toy_random)[0]
    path = _csv(tmp_path / "bad.csv", [(p.clean, p.corrupted, p.answer, p.wrong_answer, roles)])
    pairs = load_dataset(path, toy_random)
    assert len(toy_random.tokenize(p.clean)) == 16
    with pytest.raises(UsageError, match=expect.replace("(", r"\(").replace(")", r"\)")):
        prepare(toy_random, pairs, "str")


def test_ingested_roles_are_catalog_rows(ioi_store):
    store = Store(ioi_store)
    assert role_names(store, 1) == ["IO", "S1", "S1+1", "S2", END]
    prompts = store.prompts(1)
    at = positions(store, 1, ["IO", "S1", "S2", END])
    assert at.shape == (20, 4)
    for row, (io, s1, s2, end) in zip(prompts.iter_rows(named=True), at, strict=True):
        tokens = row["clean_tokens"]
        assert tokens[io] == row["answer_token"]
        assert tokens[s1] == tokens[s2] == row["wrong_answer_token"]
        assert end == row["seq_len"] - 1
    lengths = sorted(set(prompts["seq_len"].to_list()))
    assert len(lengths) > 1  # END is not one position: the reason roles exist
    rows = store.sql("SELECT count(*) AS n, count(DISTINCT role) AS roles FROM prompt_roles")
    assert rows.row(0) == (100, 5)
    frame = run_roles(store, 1)
    assert frame.columns == ["prompt_idx", "role", "pos"] and frame.height == 100
    assert frame.filter(frame["prompt_idx"] == 0)["role"].to_list() == role_names(store, 1)
    params = store.run(1)["params"]
    assert params["roles"]["names"] == role_names(store, 1) and len(params["roles"]["sha256"]) == 16
    with pytest.raises(UsageError, match="run 1 has no role 'XX'; its roles: IO, S1, S1\\+1"):
        positions(store, 1, ["XX"])


def _as_before_roles(path, version: int = 3) -> None:
    """Make a store look as an actstore before roles wrote it: no prompt_roles table, no roles
    in the run's parameters, schema `version`."""
    from actstore.core.catalog import SCHEMA_VERSION

    as_version(path, min(version, SCHEMA_VERSION - 1))  # every table and column added since
    con = duckdb.connect(str(path / "catalog.duckdb"))
    if version == SCHEMA_VERSION:  # the current schema, without the roles table
        con.execute("DROP TABLE IF EXISTS prompt_roles")
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(version)])
    (params,) = con.execute("SELECT params FROM runs WHERE run_id = 1").fetchall()[0]
    old = json.loads(params)
    del old["roles"]
    con.execute(
        "UPDATE runs SET params = ?, params_hash = ? WHERE run_id = 1",
        [json.dumps(old, sort_keys=True), params_hash(old)],
    )
    con.close()


def test_a_store_from_before_roles_reads_as_end_only(ioi_store, tmp_path):
    from actstore.core.catalog import SCHEMA_VERSION

    path = shutil.copytree(ioi_store, tmp_path / "old")
    _as_before_roles(path, version=SCHEMA_VERSION)  # no table, and nothing to migrate
    before = (path / "catalog.duckdb").read_bytes()
    store = Store(path)
    assert role_names(store, 1) == [END]
    ends = store.prompts(1)["seq_len"].to_numpy() - 1
    assert np.array_equal(positions(store, 1, [END])[:, 0], ends)
    assert run_roles(store, 1)["role"].unique().to_list() == [END]
    with pytest.raises(UsageError, match="run 1 has no role 'IO'; its roles: END"):
        positions(store, 1, ["IO"])
    assert (path / "catalog.duckdb").read_bytes() == before  # reading wrote nothing

    shutil.rmtree(path)
    path = shutil.copytree(ioi_store, tmp_path / "v3")
    _as_before_roles(path)
    store = Store(path)  # read as it is; the first writer migrates it: its run has no rows
    assert role_names(store, 1) == [END]
    with store.writer("migrate"):
        pass
    tables = store.sql("SELECT table_name FROM information_schema.tables")["table_name"]
    assert "prompt_roles" in tables.to_list()
    assert store.sql("SELECT count(*) FROM prompt_roles").item() == 0
    assert role_names(store, 1) == [END]
    assert run_roles(store, 1)["pos"].to_list() == ends.tolist()


def test_roles_are_part_of_the_run_parameters(ioi_store, tmp_path, session_ingest):
    """A run recorded without roles is not the same run as today's ingest of the same command:
    the ingest makes a new run that has them, rather than returning the old one."""
    from ingest.runner import ingest

    path = shutil.copytree(ioi_store, tmp_path / "old")
    _as_before_roles(path)
    row = ingest(Store(path, create=True), model="toy-random", task="ioi", n=20, batch_size=8)
    assert row["outcome"].to_list() == ["new"] and row["run_id"].to_list() == [2]
    store = Store(path)
    assert role_names(store, 1) == [END]
    assert role_names(store, 2) == ["IO", "S1", "S1+1", "S2", END]
    assert np.array_equal(
        positions(store, 2, ["IO", "S2", END]),
        positions(Store(ioi_store), 1, ["IO", "S2", END]),
    )


def test_sharded_ingest_records_the_same_roles(ioi_store, tmp_path, session_ingest):
    from ingest.runner import ingest
    from ingest.shards import merge

    path = tmp_path / "sharded"
    for i in range(2):
        ingest(Store(path, create=True), model="toy-random", task="ioi", n=20, batch_size=8,
               shard=f"{i}/2")  # fmt: skip
    merge(Store(path, create=True))
    assert run_roles(Store(path), 1).equals(run_roles(Store(ioi_store), 1))


# ---- position-resolved patching by role ---------------------------------------------------


def test_absolute_positions_on_a_run_of_several_lengths_are_refused(ioi_store):
    from queries.patching import check_spec

    store = Store(ioi_store)
    before = store.sql("SELECT count(*) FROM queries").item()
    with pytest.raises(UsageError) as err:
        check_spec(store, 1, "resid", "logit-diff", "denoise", 1, "14")
    assert str(err.value) == (
        "--positions 14: run 1's prompts have 15, 16 and 19 tokens, so a position number is a "
        "different token in each; give roles: IO, S1, S1+1, S2, END"
    )
    default = check_spec(store, 1, "resid", "logit-diff", "denoise", 1, None)
    assert default.roles == ("IO", "S1", "S1+1", "S2", END) and default.positions is None
    assert default.params()["roles"] == list(default.roles)
    refusals = [
        ("IO,3", "give role names or position numbers, not both"),
        ("IO,XX", "--positions IO,XX: run 1 has no role 'XX'; its roles: IO"),
    ]
    for bad, message in refusals:
        with pytest.raises(UsageError, match=message.replace("(", r"\(")):
            check_spec(store, 1, "resid", "logit-diff", "denoise", 1, bad)
    assert store.sql("SELECT count(*) FROM queries").item() == before


def _logit_diff(model, prompts, tokens, hooks) -> float:
    import torch

    with torch.no_grad():
        logits = model.hooked_logits(tokens, hooks)
    rows = torch.arange(tokens.shape[0])
    final = logits[rows, torch.as_tensor(prompts["seq_len"].to_numpy() - 1)]
    answer = torch.tensor(prompts["answer_token"].to_list()).long()
    wrong = torch.tensor(prompts["wrong_answer_token"].to_list()).long()
    return float((final[rows, answer] - final[rows, wrong]).mean())


@pytest.mark.parametrize("component", ["resid", "head-pos"])
def test_role_patch_is_each_prompt_patched_at_its_own_position(ioi_store, toy_random, component):
    """The effect of patching a role equals a hooked full forward of every corrupted prompt with
    the clean activation put in at that prompt's position of the role (and nowhere else)."""
    import torch
    from reading import read_hook

    from queries.patching import check_spec, compute_effects

    store = Store(ioi_store)
    roles = ["IO", "S2", END]
    spec = check_spec(store, 1, component, "logit-diff", "denoise", 1, ",".join(roles))
    ours = compute_effects(store, 1, spec, toy_random)[0]
    at = torch.as_tensor(positions(store, 1, roles))
    prompts = store.prompts(1)
    tokens = torch.as_tensor(store.read(1, "corrupted", "tokens")).long()
    rows = torch.arange(tokens.shape[0])
    n_heads = toy_random.shape.n_heads if component == "head-pos" else 1
    assert ours.height == toy_random.shape.n_layers * n_heads * len(roles)
    kind = "attn.hook_z" if component == "head-pos" else "hook_resid_pre"
    checked = 0
    for layer in range(toy_random.shape.n_layers):
        name = f"blocks.{layer}.{kind}"
        clean = read_hook(store, 1, "clean", name, toy_random)
        for j, role in enumerate(roles):
            for head in range(n_heads) if component == "head-pos" else [None]:

                def put(act, hook, j=j, head=head, clean=clean):
                    act = act.clone()
                    where = (rows, at[:, j]) if head is None else (rows, at[:, j], head)
                    act[where] = clean[where].to(act.dtype)
                    return act

                want = _logit_diff(toy_random, prompts, tokens, [(name, put)])
                row = ours.filter(
                    (ours["layer"] == layer) & (ours["role"] == role)
                    & (ours["head"].is_null() if head is None else ours["head"] == head)
                )  # fmt: skip
                assert row["value"].item() == pytest.approx(want, abs=1e-4), (layer, role, head)
                checked += 1
    assert checked == ours.height
    assert ours["pos"].is_null().all()  # IO, S2 and END sit at different positions by prompt
    assert ours["role"].to_list()[: len(roles)] == roles  # in the order asked, per head


def test_role_patch_recorded_once_and_cli(ioi_copy, toy_random):
    from click.testing import CliRunner

    from actstore.app.cli import main
    from queries.patching import patch

    store = Store(ioi_copy)
    first = patch(store, 1, "resid", positions="END,IO", model=toy_random)
    assert first["role"].to_list()[:2] == [END, "IO"]
    again = patch(store, 1, "resid", positions=[END, "IO"])
    assert again.equals(first)
    row = store.sql("SELECT params FROM queries").item()
    assert json.loads(row)["roles"] == [END, "IO"]
    result = CliRunner().invoke(
        main, ["patch", str(ioi_copy), "--run", "1", "--component", "resid", "--positions",
               "END,IO", "--format", "csv"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "query_id,layer,head,pos,role,metric,value,normalized,importance"
    assert lines[1].startswith("1,0,,,END,logit-diff,") and lines[2].startswith("1,0,,,IO,")


def test_role_heatmap_axis_names_the_roles(ioi_copy, toy_random, tmp_path, monkeypatch):
    from queries.analysis import plot as plots
    from queries.patching import patch

    store = Store(ioi_copy)
    query = patch(store, 1, "resid", positions="IO,S1,S2,END", model=toy_random)
    seen = {}
    real = plots._save

    def save(plt, fig, note, out):
        ax = fig.axes[0]
        seen["x"] = ax.get_xlabel()
        seen["ticks"] = [t.get_text() for t in ax.get_xticklabels()]
        seen["title"] = ax.get_title()
        real(plt, fig, note, out)

    monkeypatch.setattr(plots, "_save", save)
    plots.plot_effects(store, int(query["query_id"][0]), tmp_path / "roles.png")
    # every prompt ends on "to"; the names differ from prompt to prompt
    assert seen["x"] == "role" and seen["ticks"] == ["IO", "S1", "S2", "END:'to'"]
    assert seen["title"] == "ioi: patching effect (role × layer)"
    assert (tmp_path / "roles.png").stat().st_size > 0


def test_report_heatmap_of_a_role_query_has_role_columns(ioi_copy, toy_random, tmp_path):
    import json as js
    import re

    from queries.analysis.report import report
    from queries.patching import patch

    store = Store(ioi_copy)
    query = int(patch(store, 1, "resid", positions="S2,IO,END", model=toy_random)["query_id"][0])
    contents = report(store, tmp_path / "r.html")
    element = contents.filter(contents["source_id"] == query)["element_id"].item()
    html = (tmp_path / "r.html").read_text()
    specs = js.loads(re.search(r"const charts = (\{.*?\});\n", html, flags=re.S).group(1))
    x = specs[element]["layer"][0]["encoding"]["x"] if "layer" in specs[element] else None
    x = x or specs[element]["encoding"]["x"]
    assert x["title"] == "role" and x["sort"] == ["S2", "IO", "END:'to'"]


def test_positions_are_labelled_by_the_role_and_token_every_prompt_has(tmp_path):
    """A same-length run labels each position by the role every prompt has there and the token
    every prompt has there; a mixed-length run only where a token is common to all; a role by
    the token every prompt has at it. A store from before token texts labels by role only."""
    from handbuilt import labelled

    from actstore.core.roles import position_labels

    store = labelled(tmp_path / "s")
    assert position_labels(store, 1) == {
        0: "0:'<bos>'", 1: "1:' When'", 2: "2 IO", 3: "3:' and'", 4: "4 END:' to'",
        "IO": "IO", "X": "X", "END": "END:' to'",
    }  # fmt: skip
    assert position_labels(store, 2) == {
        0: "0:'<bos>'", 1: "1:' When'", 2: "2 IO", 3: "3", 4: "4",
        "IO": "IO", "X": "X", "END": "END:' to'",
    }  # fmt: skip
    rows = store.sql("SELECT * FROM position_labels WHERE run_id = 1 ORDER BY role, pos")
    assert rows.columns == ["run_id", "pos", "role", "label"]  # what exports give
    assert rows.filter(pl.col("role").is_not_null()).rows() == [
        (1, 4, "END", "END:' to'"), (1, 2, "IO", "IO"), (1, None, "X", "X")
    ]  # fmt: skip
    old = shutil.copytree(store.path, tmp_path / "old")
    as_version(old, 10)  # before token texts and the view (a reader leaves it so)
    con = duckdb.connect(str(old / "catalog.duckdb"))
    con.execute("DROP VIEW position_labels")
    con.close()
    assert position_labels(Store(old), 1) == {}
    with Store(old).writer("migrate"):
        pass
    assert position_labels(Store(old), 1) == {0: "0", 1: "1", 2: "2 IO", 3: "3", 4: "4 END",
                                              "IO": "IO", "X": "X", "END": "END"}  # fmt: skip


def test_heatmap_and_report_label_positions_by_token(tmp_path, monkeypatch):
    import json as js

    from handbuilt import labelled

    from queries.analysis import plot as plots
    from queries.analysis.report import report

    store = labelled(tmp_path / "s")
    seen = {}
    real = plots._save

    def save(plt, fig, note, out):
        seen["ticks"] = [t.get_text() for t in fig.axes[0].get_xticklabels()]
        real(plt, fig, note, out)

    monkeypatch.setattr(plots, "_save", save)
    query = store.sql("SELECT max(query_id) FROM queries").item()
    plots.plot_effects(store, query, tmp_path / "p.png")
    want = ["0:'<bos>'", "1:' When'", "2 IO", "3:' and'", "4 END:' to'"]
    assert seen["ticks"] == want
    contents = report(store, tmp_path / "r.html")
    element = contents.filter(contents["source_id"] == query)["element_id"].item()
    html = (tmp_path / "r.html").read_text()
    specs = js.loads(re.search(r"const charts = (\{.*?\});\n", html, flags=re.S).group(1))
    spec = specs[element]
    x = (spec["layer"][0] if "layer" in spec else spec)["encoding"]["x"]
    assert x["sort"] == want
    values = spec.get("data", {}).get("values") or spec["layer"][0]["data"]["values"]
    assert {v["position"] for v in values} == set(want)
