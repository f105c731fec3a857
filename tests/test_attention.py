"""`actstore attention`: per head, the mean attention from one role to others, each prompt read
at its own positions of the roles; recorded like every query; one-line refusals."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from click.testing import CliRunner

from actstore.app.cli import main
from actstore.core.errors import UsageError
from actstore.core.roles import positions
from actstore.core.store import Store


def test_attention_by_role_is_the_bridges_pattern_at_each_prompts_roles(ioi_copy, toy_random):
    from queries.attention import attention

    store = Store(ioi_copy)
    rows = attention(store, 1, "END", "IO,S1,S2", model=toy_random)
    s = toy_random.shape
    assert rows.columns == ["query_id", "layer", "head", "from_role", "to_role", "side", "value"]
    assert rows.height == s.n_layers * s.n_heads * 3
    assert rows["to_role"].to_list()[:3] == ["IO", "S1", "S2"] and set(rows["side"]) == {"clean"}
    at = torch.as_tensor(positions(store, 1, ["END", "IO", "S1", "S2"]))
    tokens = torch.as_tensor(store.read(1, "clean", "tokens")).long()
    names = {f"blocks.{layer}.attn.hook_pattern" for layer in range(s.n_layers)}
    with torch.no_grad():
        _, cache = toy_random.run_with_cache(tokens, names)
    b = torch.arange(tokens.shape[0])
    for layer in range(s.n_layers):
        pattern = cache[f"blocks.{layer}.attn.hook_pattern"]  # (B, H, T, T)
        for j, role in enumerate(["IO", "S1", "S2"], start=1):
            want = pattern[b, :, at[:, 0], at[:, j]].double().mean(0).numpy()  # (H,)
            got = rows.filter((rows["layer"] == layer) & (rows["to_role"] == role))
            np.testing.assert_allclose(got.sort("head")["value"].to_numpy(), want, atol=1e-6)
    # asked again: read from the catalog, one query recorded
    assert attention(store, 1, "END", ["IO", "S1", "S2"]).equals(rows)
    assert store.sql("SELECT count(*) FROM queries WHERE kind = 'attention'").item() == 1
    assert store.sql("SELECT count(*) FROM attention").item() == rows.height


def test_attention_cli_defaults_to_every_role(ioi_copy, toy_random, monkeypatch):
    import queries.core.run_model

    monkeypatch.setattr(queries.core.run_model, "load_model", lambda spec, device=None: toy_random)
    result = CliRunner().invoke(
        main, ["attention", str(ioi_copy), "--run", "1", "--side", "corrupted", "--format", "csv"]
    )
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    assert lines[0] == "query_id,layer,head,from_role,to_role,side,value"
    assert [line.split(",")[4] for line in lines[1:6]] == ["IO", "S1", "S1+1", "S2", "END"]
    end_to_end = [float(line.split(",")[6]) for line in lines[1:] if ",END,END," in line]
    assert all(0.0 <= v <= 1.0 for v in end_to_end) and len(end_to_end) == 16


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"source": "END,IO"}, "--from END,IO: give one role (roles: IO, S1, S1+1, S2, END)"),
        ({"to": "IO,XX"}, "--to IO,XX: run 1 has no role 'XX'; its roles: IO, S1, S1+1, S2, END"),
        ({"side": "both"}, "--side both: choose one of clean, corrupted"),
        ({"batch_size": 0}, "--batch-size 0: need at least 1"),
    ],
)
def test_bad_attention_input_is_one_line_and_writes_nothing(ioi_store, kwargs, message):
    from queries.attention import attention

    store = Store(ioi_store)
    with pytest.raises(UsageError) as err:
        attention(store, 1, **kwargs)
    assert str(err.value) == message


def test_report_has_an_attention_section(ioi_copy, toy_random, tmp_path):
    from queries.analysis.report import report
    from queries.attention import attention

    store = Store(ioi_copy)
    empty = tmp_path / "empty.html"
    report(store, empty)
    assert "No attention queries for these runs" in empty.read_text()
    rows = attention(store, 1, "END", "IO,S2", model=toy_random)
    out = tmp_path / "report.html"
    report(store, out)
    html = out.read_text()
    assert "Attention by role" in html and "END → IO" in html and "END → S2" in html
    top = rows.filter(rows["to_role"] == "IO").sort("value", descending=True).row(0, named=True)
    first = html.index("attention query")
    assert f"a{top['layer']}.h{top['head']}" in html[first:]


def test_head_scores_equal_transformer_lens_detect_head(ioi_copy, toy_random):
    """Previous-token, duplicate-token and induction scores per head equal TransformerLens 4.3's
    `head_detector.detect_head` on the run's own prompts (its default "mul" measure, one prompt
    at a time, mean over prompts) within 1e-5; recorded once."""
    from transformer_lens.head_detector import detect_head

    from queries.attention import head_scores

    store = Store(ioi_copy)
    ours = head_scores(store, 1, model=toy_random)
    s = toy_random.shape
    assert ours.height == s.n_layers * s.n_heads * 3
    prompts = store.prompts(1)
    texts = prompts["clean_text"].to_list()
    bridge = toy_random.bridge
    assert bridge.to_tokens(texts[0])[0].tolist() == prompts["clean_tokens"][0].to_list()
    for ours_name, theirs in [("previous-token", "previous_token_head"),
                              ("duplicate-token", "duplicate_token_head"),
                              ("induction", "induction_head")]:  # fmt: skip
        with torch.no_grad():
            want = detect_head(bridge, texts, theirs).double().numpy()  # (layers, heads)
        got = ours.filter(ours["class"] == ours_name).sort("layer", "head")["value"].to_numpy()
        np.testing.assert_allclose(got.reshape(want.shape), want, atol=1e-5, err_msg=ours_name)
    prev = ours.filter(ours["class"] == "previous-token")["value"]
    assert prev.max() > prev.min()  # the scores tell heads apart
    assert head_scores(store, 1).equals(ours)
    assert store.sql("SELECT count(*) FROM queries WHERE kind = 'head-scores'").item() == 1
    # one statement joins attention, head classes (and patching, where the run has it)
    from queries.attention import attention

    attention(store, 1, "END", "IO", model=toy_random)
    joined = store.sql(
        "SELECT layer, head, attention, induction FROM attention_heads WHERE to_role = 'IO' "
        "ORDER BY layer, head"
    )
    induction = ours.filter(ours["class"] == "induction").sort("layer", "head")["value"]
    np.testing.assert_allclose(joined["induction"].to_numpy(), induction.to_numpy())


def test_a_recomputed_attention_query_supersedes_the_old_one(ioi_copy, toy_random, tmp_path):
    """`attention` and `heads` asked again with recompute record new queries: the view
    attention_heads and the report's attention section show the newest, not both."""
    from queries.analysis.report import report
    from queries.attention import attention, head_scores

    store = Store(ioi_copy)
    ids = []
    for recompute in (False, True):
        rows = attention(store, 1, "END", "IO", model=toy_random, recompute=recompute)
        head_scores(store, 1, model=toy_random, recompute=recompute)
        ids.append(int(rows["query_id"][0]))
    old, new = ids
    assert old != new
    shown = store.sql("SELECT attention_id, count(*) AS n FROM attention_heads GROUP BY 1")
    n_heads = toy_random.shape.n_layers * toy_random.shape.n_heads
    assert shown.rows() == [(new, n_heads)]  # one row per head: one head_scores query each
    report(store, tmp_path / "r.html")
    html = (tmp_path / "r.html").read_text()
    assert f"attention query {new} " in html and f"attention query {old} " not in html
