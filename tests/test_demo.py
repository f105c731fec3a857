"""`actstore demo`: runs end to end on the toy model, and every overlap number it prints equals
the same statistic computed directly in SQL over the stored effects."""

from __future__ import annotations

import io
import math
import re

import numpy as np
import polars as pl
import pytest
from reading import read_hook

from actstore.app import demo as demo_module
from actstore.core.store import Store

pytestmark = pytest.mark.slow


def parse_table(lines: list[str]) -> list[dict[str, str]]:
    header = lines[0].split()
    return [dict(zip(header, line.split(), strict=True)) for line in lines[2:]]


def section(out: str, title: str) -> list[str]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 1
    end = next(i for i in range(start, len(lines)) if not lines[i].strip())
    return lines[start:end]


def test_demo_overlap_printed_equals_sql(demo_run):
    directory, out, returned, _ = demo_run
    store = Store(directory / "store")
    queries = {
        int(m.group(1)): int(m.group(2)) for m in re.finditer(r"run (\d+) ioi \(query (\d+)\)", out)
    }
    assert sorted(queries) == [1, 2]
    rows = parse_table(section(out, "overlap of the top 4 heads"))
    assert len(rows) == 1
    row = rows[0]
    qa, qb = queries[int(row["run_a"])], queries[int(row["run_b"])]
    shared = store.sql(
        f"select count(*) from top_heads a join top_heads b using (node) "
        f"where a.query_id = {qa} and b.query_id = {qb} and a.rank <= 4 and b.rank <= 4"
    ).item()
    universe = store.sql(
        "select n_layers * n_heads from models join runs using (model) where run_id = 1"
    ).item()
    assert int(row["intersection"]) == shared
    assert (int(row["n_a"]), int(row["n_b"]), int(row["universe"])) == (4, 4, universe)
    assert float(row["iou"]) == pytest.approx(shared / (8 - shared), abs=1e-6)
    assert float(row["frac_of_a"]) == pytest.approx(shared / 4, abs=1e-6)
    exact = sum(math.comb(4, x) * math.comb(universe - 4, 4 - x) for x in range(shared, 5))
    assert float(row["p_value"]) == pytest.approx(exact / math.comb(universe, 4), rel=1e-5)
    assert returned.filter(pl.col("run_a") == 1, pl.col("run_b") == 2)["intersection"].item() == (
        shared
    )


def test_demo_top_heads_printed_equal_view(demo_run):
    directory, out, _, _ = demo_run
    store = Store(directory / "store")
    for m in re.finditer(r"run (\d+) ioi \(query (\d+)\): (.*)", out):
        printed = [part.split()[0] for part in m.group(3).split(", ")]
        expected = store.sql(
            f"select node from top_heads where query_id = {m.group(2)} and rank <= 4 order by rank"
        )["node"].to_list()
        assert printed == expected


def test_demo_writes_plots_and_sql_lines(demo_run):
    directory, out, _, seconds = demo_run
    plots = sorted(p.name for p in (directory / "plots").glob("*.png"))
    assert {
        "effects_run1.png",
        "effects_run2.png",
        "effects_run3.png",
        "overlap_heads.png",
        "overlap_edges.png",
        "faithfulness_run1.png",
        "faithfulness_run3.png",
    } == set(plots)
    for name in plots:
        assert f"plot:   {directory / 'plots' / name}" in out
    assert f"store:  {directory / 'store'}" in out
    sql_lines = [line for line in out.splitlines() if line.strip().startswith("actstore sql")]
    assert len(sql_lines) == 3
    store = Store(directory / "store")
    for line in sql_lines:  # each suggested query runs
        query = line.split('"')[1]
        assert store.sql(query).height > 0
    assert seconds < 120


def test_demo_circuit_reaches_85_percent(demo_run):
    directory, out, _, _ = demo_run
    store = Store(directory / "store")
    m = re.search(r"circuit of run 1 \(ioi\) reaching faithfulness 0.85: (\d+) of (\d+) edges, "
                  r"faithfulness ([\d.]+) \(circuit (\d+), score set (\d+)\)", out)  # fmt: skip
    assert m, out
    row = store.sql(f"select * from circuits where circuit_id = {m.group(4)}").row(0, named=True)
    assert row["faithfulness"] >= 0.85 and f"{row['faithfulness']:.3f}" == m.group(3)
    assert row["n_edges"] == int(m.group(1)) and row["score_id"] == int(m.group(5))
    method = store.sql(f"select params from queries where query_id = {m.group(5)}").item()
    assert '"method": "eap-ig"' in method


def test_demo_greater_than_prob_diff_equals_a_direct_computation(demo_run):
    """The printed clean and corrupted prob-diff: Σ p(years after) − Σ p(years up to the
    start year), recomputed here from the run's logits (derived from its final residual) and
    the prompts' answer sets."""
    directory, out, _, _ = demo_run
    store = Store(directory / "store")
    m = re.search(r"greater-than \(run (\d+)\) by prob-diff.*\n  clean (-?[\d.]+), corrupted "
                  r"(-?[\d.]+)", out)  # fmt: skip
    assert m, out
    run = int(m.group(1))
    prompts = store.prompts(run)
    for side, printed in (("clean", m.group(2)), ("corrupted", m.group(3))):
        logits = read_hook(store, run, side, "logits").numpy().astype(np.float64)
        p = np.exp(logits - logits.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        sets = zip(prompts["answer_tokens"], prompts["wrong_answer_tokens"], strict=True)
        values = [p[i, good].sum() - p[i, bad].sum() for i, (good, bad) in enumerate(sets)]
        assert f"{np.mean(values):.3f}" == printed
    assert "greater-than" in out and "top 4 heads (query" in out


def test_demo_rerun_reuses_runs(demo_run):
    directory, _, first, _ = demo_run
    again = demo_module.demo(directory, tasks=["ioi", "ioi"], n=8, top_k=4, out=io.StringIO())
    assert Store(directory / "store").runs().height == 3  # two IOI samples and Greater-Than
    assert again.select("intersection", "iou").equals(first.select("intersection", "iou"))


def test_demo_refuses_foreign_directory(tmp_path):
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(Exception, match="not empty and holds no demo store"):
        demo_module.demo(tmp_path, tasks=["ioi", "ioi"])


def test_demo_model_option_refuses_an_unknown_model_before_any_work(tmp_path):
    from click.testing import CliRunner

    from actstore.app.cli import main

    result = CliRunner().invoke(main, ["demo", str(tmp_path / "d"), "--model", "toy-nope"])
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and "unknown built-in model 'toy-nope'; built-in models: toy" in lines[0]
    assert "toy-llama" in lines[0]
    assert not (tmp_path / "d").exists()


def test_demo_runs_on_toy_llama(tmp_path):
    """`actstore demo --model toy-llama`: the whole pipeline on the Llama built-in (RMSNorm,
    rotary, grouped-query attention, SwiGLU), every run on that model, an IOI circuit reaching
    85% faithfulness as the stored circuit row says."""
    from click.testing import CliRunner

    from actstore.app.cli import main

    directory = tmp_path / "d"
    args = ["demo", str(directory), "--model", "toy-llama", "--n", "8"]
    result = CliRunner().invoke(main, args)
    assert result.exit_code == 0, result.output
    out = result.output
    assert "actstore demo: model toy-llama, tasks ioi, colored-objects, 8 prompt pairs each" in out
    m = re.search(r"circuit of run 1 \(ioi\) reaching faithfulness 0.85: (\d+) of (\d+) edges, "
                  r"faithfulness ([\d.]+) \(circuit (\d+)", out)  # fmt: skip
    assert m, out
    store = Store(directory / "store")
    row = store.sql(f"select * from circuits where circuit_id = {m.group(4)}").row(0, named=True)
    assert row["faithfulness"] >= 0.85 and f"{row['faithfulness']:.3f}" == m.group(3)
    assert row["n_edges"] == int(m.group(1)) < int(m.group(2))
    runs = store.runs()
    assert runs["model"].unique().to_list() == ["toy-llama"] and runs.height == 3
