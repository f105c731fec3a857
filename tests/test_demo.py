"""`actstore demo`: runs end to end on the toy model, and every overlap number it prints equals
the same statistic computed directly in SQL over the stored effects."""

from __future__ import annotations

import io
import math
import re
import time

import numpy as np
import polars as pl
import pytest

from actstore.results import record_query
from actstore.store import Store
from queries import demo as demo_module


def stand_in_patch(store, run_id, component, metric, direction):
    """Used only where queries.patching is not in this build: records, as a `patch` query,
    each head's mean |z_clean − z_corrupted| at the final position, read from the run (a real
    per-head number from the store; not a patching effect)."""
    run = store.run(run_id)
    finals = store.prompts(run_id)["seq_len"].to_numpy() - 1
    rows = []
    for layer in range(4):
        hook = f"blocks.{layer}.attn.hook_z"
        idx = np.arange(len(finals))
        diff = (
            store.read(run_id, "clean", hook)[idx, finals]
            - store.read(run_id, "corrupted", hook)[idx, finals]
        )
        for head, value in enumerate(np.abs(diff).mean(axis=(0, 2))):
            rows.append((layer, head, None, metric, float(value), float(value)))
    frame = pl.DataFrame(
        rows, orient="row",
        schema={"layer": pl.Int32, "head": pl.Int32, "pos": pl.Int32, "metric": pl.String,
                "value": pl.Float64, "normalized": pl.Float64},
    )  # fmt: skip
    params = {"component": component, "metric": metric, "direction": direction, "window": 1}
    assert run["status"] == "complete"
    return record_query(store, "patch", run_id, params, 0.0, {"effects": frame})


def parse_table(lines: list[str]) -> list[dict[str, str]]:
    header = lines[0].split()
    return [dict(zip(header, line.split(), strict=True)) for line in lines[2:]]


def section(out: str, title: str) -> list[str]:
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith(title)) + 1
    end = next(i for i in range(start, len(lines)) if not lines[i].strip())
    return lines[start:end]


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
    patch = None if demo_module._analysis("patch") else stand_in_patch
    directory = tmp_path_factory.mktemp("demo") / "d"
    out = io.StringIO()
    started = time.monotonic()
    df = demo_module.demo(directory, tasks=["ioi", "ioi"], n=8, top_k=4, patch=patch, out=out)
    return directory, out.getvalue(), df, time.monotonic() - started


def test_demo_overlap_printed_equals_sql(demo_run):
    directory, out, returned, _ = demo_run
    store = Store(directory / "store")
    queries = {
        int(m.group(1)): int(m.group(2)) for m in re.finditer(r"run (\d+) ioi \(query (\d+)\)", out)
    }
    assert sorted(queries) == [1, 2]
    rows = parse_table(section(out, "overlap of the top-4 head sets:"))
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
    assert (int(row["n_a"]), int(row["n_b"])) == (4, 4)
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
    assert {"effects_run1.png", "effects_run2.png", "overlap_heads.png"} <= set(plots)
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


def test_demo_rerun_reuses_runs(demo_run):
    directory, _, first, _ = demo_run
    patch = None if demo_module._analysis("patch") else stand_in_patch
    again = demo_module.demo(
        directory, tasks=["ioi", "ioi"], n=8, top_k=4, patch=patch, out=io.StringIO()
    )
    assert Store(directory / "store").runs().height == 2
    assert again.select("intersection", "iou").equals(first.select("intersection", "iou"))


def test_demo_refuses_foreign_directory(tmp_path):
    (tmp_path / "other.txt").write_text("x")
    with pytest.raises(Exception, match="not empty and holds no demo store"):
        demo_module.demo(tmp_path, tasks=["ioi", "ioi"])
