"""`actstore report`: one self-contained HTML page; what it draws equals what the catalog holds.

The browser test renders the report of a demo store in Debian's headless Chromium driven by
Playwright (its own browser download cannot be reached here), with every network request
refused, and checks the page as an analyst would use it: no console errors, one element per
heatmap cell and per circuit node and edge, hover tooltips showing the stored numbers.
"""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner

import actstore
from actstore.app.cli import main
from actstore.core.errors import ActstoreError, UsageError
from queries.analysis.report.charts import number

MAX_BYTES = 10_000_000
CHROMIUM_ARGS = [
    "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
    "--disable-component-update", "--no-first-run", "--disable-sync", "--disable-extensions",
]  # fmt: skip


def assert_self_contained(html: str) -> None:
    """Nothing is fetched: no external scripts, styles, frames or images."""
    assert "<script src" not in html and "<link" not in html
    assert not re.search(r"""(src|href)=["']?(https?:)?//""", html)
    assert html.count("<script>") == 2  # the vega bundle and the charts


def test_report_draws_what_the_catalog_holds(hand_store, tmp_path):
    path, ids = hand_store
    store = actstore.open(str(path))
    out = tmp_path / "report.html"
    contents = store.report(str(out), top_k=3, edge_top_k=4)
    html = out.read_text()
    assert_self_contained(html)
    assert out.stat().st_size < MAX_BYTES
    for element in contents["element_id"]:
        assert f'id="{element}"' in html
    marks = {(s, i): m for s, i, m in contents.select("section", "source_id", "marks").rows()}
    for name in ("patch1", "patch2", "resid1", "patch4"):
        expected = store.sql(f"select count(*) from effects where query_id = {ids[name]}").item()
        assert marks[("patching", ids[name])] == expected
    for name in ("circuit1", "circuit2"):
        edges = store.sql(f"select count(*) from circuit_edges where circuit_id = {ids[name]}")
        row = contents.filter(contents["source_id"] == ids[name], contents["section"] == "circuit")
        assert row["marks"].item() == edges.item() == 4
        assert row["nodes"].item() == 5  # planted top-4 edges touch 5 distinct nodes
    # run 4 is of another model: the head overlap of runs 1, 2, 4 is refused, with the reason
    assert "different numbers of heads" in html
    assert ("faithfulness", ids["scores1"]) in marks


def test_report_of_chosen_runs_lists_shared_heads(hand_store, tmp_path):
    path, ids = hand_store
    store = actstore.open(str(path))
    out = tmp_path / "runs12.html"
    contents = store.report(str(out), runs=[1, 2], top_k=3, edge_top_k=4)
    assert set(contents.filter(contents["section"] == "patching")["source_id"]) == {
        ids["patch1"],
        ids["patch2"],
        ids["resid1"],
    }
    html = out.read_text()
    # planted: the top-3 head sets share a0.h1 and a2.h3, the top-4 edge sets three edges
    assert "a0.h1, a2.h3" in html
    assert "a0.h1-&gt;m1" not in html.split("shared edges")[1].split("</table>")[0]
    overlaps = contents.filter(contents["section"] == "overlap")
    assert overlaps["marks"].to_list() == [4, 4]  # two 2×2 matrices


def test_report_errors_leave_store_unchanged(hand_store, tmp_path):
    path, _ = hand_store
    catalog = Path(path) / "catalog.duckdb"
    before = hashlib.sha256(catalog.read_bytes()).hexdigest()
    runner = CliRunner()
    res = runner.invoke(main, ["report", str(path), "-o", str(tmp_path / "r.html"), "--runs", "9"])
    assert res.exit_code == 2 and "run 9 is not in" in res.output
    assert len(res.output.strip().splitlines()) == 1
    res = runner.invoke(main, ["report", str(path), "-o", str(tmp_path / "no" / "r.html")])
    assert res.exit_code == 1 and "no directory" in res.output
    res = runner.invoke(
        main, ["report", str(path), "-o", str(tmp_path / "r.html"), "--top-k", "2",
               "--top-frac", "0.1"],
    )  # fmt: skip
    assert res.exit_code == 2 and "choose the sets one way" in res.output
    assert not list(tmp_path.rglob("*.html")) and not list(tmp_path.rglob(".*partial"))
    assert hashlib.sha256(catalog.read_bytes()).hexdigest() == before
    with pytest.raises(UsageError, match="each run may appear once"):
        actstore.open(str(path)).report(str(tmp_path / "r.html"), runs=[1, 1])
    with pytest.raises(ActstoreError, match="cannot write"):
        actstore.open(str(path)).report(str(tmp_path))  # a directory


@pytest.mark.slow
def test_cli_report_prints_contents_without_torch(hand_store, tmp_path):
    path, ids = hand_store
    out = tmp_path / "r.html"
    args = ["report", str(path), "-o", str(out), "--runs", "1,2", "--format", "csv"]
    code = (
        "import sys; from click.testing import CliRunner; from actstore.app.cli import main; "
        f"r = CliRunner().invoke(main, {args!r}); assert r.exit_code == 0, r.output; "
        "print(r.stdout, end=''); print(r.stderr, end='', file=sys.stderr); "
        "print('torch' in sys.modules, 'transformer_lens' in sys.modules)"
    )
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    lines = res.stdout.splitlines()
    assert lines[-1] == "False False", res.stderr
    assert lines[0] == "section,source_id,element_id,title,marks,nodes"
    assert any(
        line.startswith(f"patching,{ids['patch1']},patch-{ids['patch1']},") for line in lines
    )
    assert f"wrote {out} (" in res.stderr
    assert out.exists()


def test_report_runs_table_and_title(tmp_path):
    """The title names the tasks and models, not the folder; a run of prompts of different
    lengths shows their range; a dataset file's run says its corrupted prompts are the file's."""
    import handbuilt
    import polars as pl

    handbuilt.build(tmp_path / "store")
    store = actstore.open(str(tmp_path / "store"))
    handbuilt.insert_by_name(store, "prompts", pl.DataFrame(
        {"run_id": [1, 1, 1, 2], "prompt_idx": [0, 1, 2, 0], "seq_len": [15, 19, 17, 12]},
        schema_overrides={"run_id": pl.Int32, "prompt_idx": pl.Int32, "seq_len": pl.Int32},
    ))  # fmt: skip
    with store.writer(), store.catalog.write() as con:
        con.execute("UPDATE runs SET dataset = 'pairs.csv' WHERE run_id = 3")
    out = tmp_path / "r.html"
    store.report(str(out), runs=[1, 2, 3], top_k=3, edge_top_k=4)
    html = out.read_text()
    assert "<title>actstore report: ioi, colored-objects on hand</title>" in html
    rows = re.findall(r"<tr><td class=\"num\">(\d)</td>(.*?)</tr>", runs_html(html))
    cells = {int(run): re.findall(r"<td[^>]*>(.*?)</td>", rest) for run, rest in rows}
    assert cells[1][3:5] == ["20", "15–19"] and cells[2][3:5] == ["20", "12"]
    assert cells[1][2] == "str" and cells[3][2] == "the file&#x27;s corrupted prompts"
    assert cells[3][7] == "pairs.csv" and cells[1][7] == "task generator"


def test_report_warns_of_sets_too_small_to_compare(hand_store, tmp_path):
    """Sets of 2 heads are compared, with the warning above the table; sets of 3 are not
    warned about; every matrix's title states k and the universe."""
    path, _ = hand_store
    store = actstore.open(str(path))
    small, enough = tmp_path / "small.html", tmp_path / "enough.html"
    store.report(str(small), runs=[1, 2], top_k=2, edge_top_k=4)
    store.report(str(enough), runs=[1, 2], top_k=3, edge_top_k=4)
    html = small.read_text()
    assert "warning: sets of fewer than 3 heads (run 1 has 2, run 2 has 2)" in html
    assert "warning: sets of fewer than" not in enough.read_text()
    titles = [spec["title"]["text"] for key, spec in page_charts(html).items()
              if key.startswith("overlap-")]  # fmt: skip
    assert titles == ["top 2 heads: sets of k = 2 heads of 12",
                      "top 4 edges: sets of k = 4 edges of 10"]  # fmt: skip


def page_charts(html: str) -> dict[str, dict]:
    """The Vega-Lite specifications the page draws, by element id."""
    found = re.search(r"const charts = (\{.*?\});\nconst options", html, re.S)
    return json.loads(found.group(1))


def test_heatmaps_share_one_signed_scale_per_metric_and_direction(hand_store, tmp_path):
    """Colour is the signed effect on a scale centred at 0: both logit-diff denoising head
    queries (planted effects up to 0.95 and down to -0.8) and the resid query share ±0.95; a
    noising query gets its own scale of normalized − 1."""
    import handbuilt

    path = tmp_path / "store"
    handbuilt.build(path)
    store = actstore.open(str(path))
    noise = handbuilt.record_noise(store, 1)
    out = tmp_path / "r.html"
    store.report(str(out), top_k=3, edge_top_k=4)
    specs = page_charts(out.read_text())
    colour = {k: v["layer"][0]["encoding"]["color"] for k, v in specs.items()
              if k.startswith("patch-")}  # fmt: skip
    top = store.sql(
        "select max(abs(normalized)) from patch_effects join query_params q using (query_id) "
        "where q.run_id in (1, 2, 3) and q.direction = 'denoise' and q.metric = 'logit-diff'"
    ).item()
    assert top == pytest.approx(0.95)
    for query in (1, 2, 3):
        assert colour[f"patch-{query}"]["field"] == "signed"
        assert colour[f"patch-{query}"]["scale"]["domain"] == [-top, top]
        assert colour[f"patch-{query}"]["scale"]["domainMid"] == 0
    lowest = store.sql(f"select min(normalized) - 1 from effects where query_id = {noise}").item()
    assert colour[f"patch-{noise}"]["title"] == "normalized − 1"
    assert colour[f"patch-{noise}"]["scale"]["domain"][0] == pytest.approx(-abs(lowest))


def test_circuit_edges_never_share_a_path():
    """Every edge of a whole 4-layer, 4-head graph drawn as the report draws it: no two edges
    have the same spline, and no edge between non-neighbouring columns runs straight (it would
    pass over the nodes between)."""
    import itertools

    import polars as pl

    from queries.analysis.report import charts

    n_layers, n_heads = 4, 4
    heads = [f"a{layer}.h{h}" for layer in range(n_layers) for h in range(n_heads)]
    nodes = ["input", *heads, *(f"m{layer}" for layer in range(n_layers)), "logits"]
    frame = pl.DataFrame({"node": nodes}).with_columns(
        pl.when(pl.col("node") == "input").then(pl.lit("input"))
        .when(pl.col("node") == "logits").then(pl.lit("logits"))
        .when(pl.col("node").str.starts_with("m")).then(pl.lit("mlp"))
        .otherwise(pl.lit("head")).alias("kind"),
        pl.col("node").str.extract(r"^[am](\d+)").cast(pl.Int64).alias("layer"),
        pl.col("node").str.extract(r"\.h(\d+)$").cast(pl.Int64).alias("head"),
    )  # fmt: skip
    placed = charts.node_positions(frame, n_layers, n_heads)
    where = {n: (x, y) for n, x, y in placed.select("node", "x", "y").iter_rows()}
    paths = []
    for src, dst in itertools.permutations(nodes, 2):
        (x1, y1), (x2, y2) = where[src], where[dst]
        if x2 <= x1:
            continue
        ends = [("q", -0.22), ("k", 0.0), ("v", 0.22)] if dst.startswith("a") else [(None, 0)]
        for _, offset in ends:
            path = charts.edge_path((x1, y1), (x2, y2 + offset), (n_heads - 1) / 2)
            paths.append(tuple(path))
            (sx, sy), (mx, my), (ex, ey) = path
            if ex - sx > 1:
                assert abs(my - (sy + ey) / 2) > 0.25, (src, dst)
    assert len(paths) > 400 and len(set(paths)) == len(paths)
    assert len({p[0] for p in paths}) == len(nodes) - 1  # every node but the logits sends


def runs_html(html: str) -> str:
    """The runs section's table."""
    return html.split('<section id="runs">')[1].split("</table>")[0]


def test_report_of_empty_store_says_what_to_run(empty_store, tmp_path):
    store = actstore.open(empty_store)
    contents = store.report(str(tmp_path / "empty.html"))
    assert contents.is_empty()
    html = (tmp_path / "empty.html").read_text()
    assert "run actstore patch STORE --run R --component head" in html


# ---- the demo store in a real browser ---------------------------------------------------------


def chromium_or_skip() -> str:
    """Debian's chromium and Playwright for Python, or a skip saying which is missing."""
    from actstore.core.errors import ActstoreError
    from actstore.core.extras import check_engine

    try:
        check_engine("dev")
    except ActstoreError as exc:
        pytest.skip(str(exc))
    browser = shutil.which("chromium") or shutil.which("chromium-browser")
    if browser is None:
        pytest.skip(
            "no chromium on PATH, and this machine could not install it (make test runs "
            "apt-get install -y chromium when it is root with apt-get)"
        )
    return browser


@pytest.fixture(scope="module")
def demo_report(demo_run):
    """The demo's store (the session's, shared with test_demo.py), with a noising head query
    (strongly negative signed effects), a circuit and a subspace query added where the demo
    made none, and its report with the default set sizes."""
    directory = demo_run[0]
    store = actstore.open(str(directory / "store"))
    assert (directory / "report.html").exists()  # the demo writes one beside the store
    store.patch(1, "head", direction="noise")
    if store.sql("select count(*) from circuits").item() == 0:
        score_id = store.sql("select min(score_id) from edge_scores").item()
        store.circuit(score_id, edges=30)
    if store.sql("select count(*) from subspace_reports").item() == 0:
        store.subspace(1, "blocks.2.hook_resid_mid", "mean-diff", pos="final", reader="unembed")
    out = directory / "full-report.html"
    contents = store.report(str(out))
    return store, out, contents


def cell_tooltip(page, element: str, layer: int, head: int) -> dict[str, str]:
    """Hover the heatmap cell of (layer, head); the tooltip's rows as {title: text}."""
    cell = heatmap_cell(page, element, layer, head)
    cell.scroll_into_view_if_needed()
    cell.hover()
    return tooltip(page)


def heatmap_cell(page, element: str, layer: int, head: int):
    cells = page.locator(f"#{element} g.mark-rect.role-mark path")
    labels = [cells.nth(i).get_attribute("aria-label") for i in range(cells.count())]
    index = next(i for i, a in enumerate(labels) if a.startswith(f"head: {head}; layer: {layer};"))
    return cells.nth(index)


def tooltip(page) -> dict[str, str]:
    page.wait_for_selector("#vg-tooltip-element.visible", timeout=5000)
    rows = page.locator("#vg-tooltip-element tr")
    return {
        rows.nth(i).locator("td.key").inner_text().strip(): rows.nth(i)
        .locator("td.value")
        .inner_text()
        .strip()
        for i in range(rows.count())
    }


def rgb(fill: str) -> tuple[int, int, int]:
    """An SVG fill (#rrggbb or rgb(r, g, b)) as integers."""
    if fill.startswith("#"):
        return tuple(int(fill[i : i + 2], 16) for i in (1, 3, 5))
    return tuple(int(float(v)) for v in re.findall(r"[\d.]+", fill)[:3])


def overlapping(boxes: list[dict]) -> list[tuple[int, int]]:
    """Pairs of bounding boxes that intersect."""

    def meet(a: dict, b: dict) -> bool:
        return (a["x"] < b["x"] + b["width"] and b["x"] < a["x"] + a["width"]
                and a["y"] < b["y"] + b["height"] and b["y"] < a["y"] + a["height"])  # fmt: skip

    return [(i, j) for i in range(len(boxes)) for j in range(i + 1, len(boxes))
            if meet(boxes[i], boxes[j])]  # fmt: skip


def table_rows(page, selector: str) -> list[dict[str, str]]:
    """An HTML table's body rows as {heading: text}."""
    table_el = page.locator(selector)
    heads = [h.strip() for h in table_el.locator("thead th").all_inner_texts()]
    rows = table_el.locator("tbody tr")
    return [
        dict(zip(heads, [c.strip() for c in rows.nth(i).locator("td").all_inner_texts()],
                 strict=True))
        for i in range(rows.count())
    ]  # fmt: skip


@pytest.mark.slow
def test_demo_report_in_chromium(demo_run, demo_report, tmp_path):
    from playwright.sync_api import sync_playwright

    executable = chromium_or_skip()
    store, out, contents = demo_report
    html = out.read_text()
    assert_self_contained(html)
    assert out.stat().st_size < MAX_BYTES
    # the title names what the store holds, not its folder; mixed prompt lengths are a range
    lengths = store.sql("select min(seq_len), max(seq_len) from prompts where run_id = 1").row(0)
    assert "<title>actstore report: ioi, greater-than on toy</title>" in html
    if lengths[0] < lengths[1]:
        assert f'<td class="num">{lengths[0]}–{lengths[1]}</td>' in html
    problems: list[str] = []
    requests: list[str] = []
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=executable, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1400, "height": 1000})
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.on("pageerror", lambda e: problems.append(str(e)))
        page.route(
            "**/*",
            lambda route: (
                route.continue_()
                if route.request.url.startswith("file://")
                else (requests.append(route.request.url), route.abort())
            ),
        )
        page.goto(out.as_uri())
        page.wait_for_selector("body[data-rendered]", timeout=30_000)
        assert page.get_attribute("body", "data-rendered") == "true"

        # one DOM element per heatmap cell: as many as the query's effect rows
        patches = store.sql("select query_id from queries where kind = 'patch' order by 1")
        for query_id in patches["query_id"]:
            n = store.sql(f"select count(*) from effects where query_id = {query_id}").item()
            assert page.locator(f"#patch-{query_id} g.mark-rect.role-mark path").count() == n

        # the noising query's most negative signed effect (normalized − 1) is drawn red, its
        # strongest positive denoising effect blue, and hover shows the stored numbers
        noise = store.sql(
            "select query_id, layer, head, value, normalized, importance from patch_effects "
            "where query_id = (select max(query_id) from query_params where kind = 'patch' and "
            "direction = 'noise') order by normalized limit 1"
        ).row(0, named=True)
        assert noise["normalized"] - 1 < -0.1
        element = f"patch-{noise['query_id']}"
        red = rgb(heatmap_cell(page, element, noise["layer"], noise["head"]).get_attribute("fill"))
        assert red[0] > red[2] + 60, red
        shown = cell_tooltip(page, element, noise["layer"], noise["head"])
        assert shown["value"] == number(noise["value"])
        assert shown["normalized"] == number(noise["normalized"])
        assert shown["normalized − 1"] == number(noise["normalized"] - 1)
        assert shown["importance"] == number(noise["importance"])
        assert "direction=noise" in shown["query"]
        top = store.sql(
            "select query_id, layer, head, value, normalized, importance from top_heads "
            "where run_id = 1 and component = 'head' and direction = 'denoise' and rank = 1"
        ).row(0, named=True)
        blue = rgb(heatmap_cell(page, f"patch-{top['query_id']}", top["layer"], top["head"])
                   .get_attribute("fill"))  # fmt: skip
        assert top["normalized"] > 0 and blue[2] > blue[0] + 60, blue
        shown = cell_tooltip(page, f"patch-{top['query_id']}", top["layer"], top["head"])
        assert shown["value"] == number(top["value"])
        assert shown["normalized"] == number(top["normalized"])
        assert shown["importance"] == number(top["importance"])
        assert (shown["layer"], shown["head"]) == (str(top["layer"]), str(top["head"]))
        assert "direction=denoise" in shown["query"] and "metric=logit-diff" in shown["query"]

        # the head overlap table says what the demo printed and what `actstore overlap` prints
        # for the same k (the default: 2% of 16 heads, at least 4)
        (listed,) = table_rows(page, "#overlap .card:first-of-type table")
        res = CliRunner().invoke(
            main, ["overlap", str(store.path), "--runs", "1,2", "--top-k", "4", "--format",
                   "json"],
        )  # fmt: skip
        assert res.exit_code == 0, res.output
        cli = next(r for r in json.loads(res.stdout) if (r["run_a"], r["run_b"]) == (1, 2))
        demo = demo_run[2].filter(demo_run[2]["run_a"] == 1, demo_run[2]["run_b"] == 2)
        for heading, column in [("|A|", "n_a"), ("|B|", "n_b"), ("|A∩B|", "intersection"),
                                ("IoU", "iou"), ("universe", "universe"),
                                ("hypergeometric p", "p_value")]:  # fmt: skip
            assert listed[heading] == page_number(cli[column]) == page_number(demo[column][0])
        assert "sets of k = 4 heads of 16" in page.locator("#overlap-1").text_content()

        # circuits: one symbol per node, none overlapping another, one curve per edge
        for circuit_id in store.sql("select circuit_id from circuits")["circuit_id"]:
            edges = store.sql(
                f"select src, dst, qkv, score from circuit_edges where circuit_id = {circuit_id}"
            )
            nodes = set(edges["src"]) | set(edges["dst"])
            chart = f"#circuit-{circuit_id}"
            assert page.locator(f"{chart} g.mark-line.edges_marks path").count() == edges.height
            symbols = page.locator(f"{chart} g.mark-symbol.role-mark path")
            assert symbols.count() == len(nodes)
            page.locator(chart).scroll_into_view_if_needed()
            assert overlapping([symbols.nth(i).bounding_box() for i in range(len(nodes))]) == []

        # hovering a node shows exactly its edges on top; hovering an edge names it and its score
        circuit_id = contents.filter(contents["section"] == "circuit")["source_id"][0]
        chart = f"#circuit-{circuit_id}"
        scores = store.sql(
            f"select src, dst, src || '->' || dst || coalesce('<' || qkv || '>', '') as edge, "
            f"score from circuit_edges where circuit_id = {circuit_id}"
        )
        node = page.locator(f"{chart} g.mark-symbol.role-mark path").first
        node.scroll_into_view_if_needed()
        node.hover()
        name = tooltip(page)["node"]
        touching = scores.filter((scores["src"] == name) | (scores["dst"] == name)).height
        page.wait_for_function(
            f"document.querySelectorAll('{chart} g.mark-line.focused_marks path').length "
            f"== {touching}",
            timeout=5000,
        )
        page.mouse.move(0, 0)
        shown = hover_an_edge(page, chart)
        by_name = dict(scores.select("edge", "score").iter_rows())
        assert shown["score"] == number(by_name[shown["edge"]])

        page.mouse.move(0, 0)
        page.evaluate("window.scrollTo(0, 0)")
        shot = tmp_path / "report.png"
        page.screenshot(path=str(shot), full_page=True)
        browser.close()
    assert problems == []
    assert requests == []
    assert shot.stat().st_size > 50_000


def hover_an_edge(page, chart: str) -> dict[str, str]:
    """Hover the middle of the chart's edge curves in turn (an edge crossed there by one drawn
    later shows that one) until a tooltip shows; its rows."""
    paths = page.locator(f"{chart} g.mark-line.edges_marks path")
    for i in range(min(paths.count(), 20)):
        x, y = page.evaluate(
            """(path) => {
              const at = path.getPointAtLength(path.getTotalLength() / 2);
              const p = new DOMPoint(at.x, at.y).matrixTransform(path.getScreenCTM());
              return [p.x, p.y];
            }""",
            paths.nth(i).element_handle(),
        )
        page.mouse.move(x, y, steps=3)
        if page.locator("#vg-tooltip-element.visible").count():
            return tooltip(page)
    raise AssertionError(f"no edge of {chart} showed a tooltip")


def page_number(value: float | int) -> str:
    """A number as the page's tables write it (`page.table`)."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)
