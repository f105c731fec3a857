"""The report's sections, each from one part of the catalog, and `report` that writes the page.

Every section states what it shows and how to read it; a section with nothing to show says which
command would fill it. The returned frame lists what the page holds (one row per chart), with
the number of data elements each chart draws.
"""

from __future__ import annotations

import datetime as dt
from importlib.metadata import version
from pathlib import Path

import polars as pl

from actstore.core.errors import ActstoreError
from actstore.core.output import refuse_inside_store, write_atomically
from actstore.core.roles import position_labels
from actstore.core.store import Store
from queries.analysis import lookups
from queries.analysis import overlap as ov
from queries.analysis.report import charts, data
from queries.analysis.report.attention import attention_section
from queries.analysis.report.page import Page, card, esc, table

CONTENTS_SCHEMA = {
    "section": pl.String,
    "source_id": pl.Int64,
    "element_id": pl.String,
    "title": pl.String,
    "marks": pl.Int64,
    "nodes": pl.Int64,
}


def entry(
    section: str, source: int, element: str, title: str, marks: int, nodes: int | None = None
) -> dict:
    """A row of the returned contents: one chart and how many data elements it draws."""
    return {"section": section, "source_id": source, "element_id": element, "title": title,
            "marks": marks, "nodes": nodes}  # fmt: skip


def _bytes(n: int | None) -> str:
    if n is None:
        return "n/a"
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if n < 1000 or unit == "TB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    raise AssertionError("unreachable")


def runs_section(page: Page, store: Store, runs: list[int]) -> None:
    df = data.runs_table(store, runs).with_columns(
        pl.col("raw_bytes").map_elements(_bytes, return_dtype=pl.String).alias("raw"),
        pl.col("stored_bytes").map_elements(_bytes, return_dtype=pl.String).alias("stored"),
        # a dataset file supplies its own corrupted prompts: no STR replacement was made
        pl.when(pl.col("dataset").is_not_null() & (pl.col("corruption") == "str"))
        .then(pl.lit("the file's corrupted prompts"))
        .otherwise(pl.col("corruption")).alias("corruption"),
        pl.col("dataset").fill_null("task generator"),
    )  # fmt: skip
    columns = {
        "run_id": "run", "model": "model", "task": "task", "corruption": "corruption",
        "n_prompts": "prompts", "tokens": "tokens", "dtype": "dtype", "seed": "seed",
        "dataset": "source", "status": "status", "n_arrays": "arrays", "raw": "raw bytes",
        "stored": "stored bytes", "ratio": "ratio", "created_at": "ingested",
    }  # fmt: skip
    body = table(df, columns, numbers=("run_id", "n_prompts", "tokens", "seed", "n_arrays",
                                       "raw", "stored", "ratio"))  # fmt: skip
    page.section(
        "runs", "Runs",
        "One run is one ingest of a task on a model: clean and corrupted prompts run once, their "
        "activations stored. Every result below names the run it came from. Tokens is the "
        "prompts' length in tokens, shortest–longest where they differ.",
        [body],
    )  # fmt: skip


def patching_section(page: Page, store: Store, runs: list[int], contents: list[dict]) -> None:
    queries = data.patch_queries(store, runs)
    effects = data.patch_effects(store, queries["query_id"].to_list())
    extents = {
        (metric, direction): charts.signed_extent(
            [effects[q] for q in same["query_id"] if q in effects], direction
        )
        for (metric, direction), same in queries.group_by("metric", "direction")
    }
    cards = []
    for query in queries.to_dicts():
        rows = effects.get(query["query_id"])
        heading = (
            f"query {query['query_id']} · run {query['run_id']} {query['task']} · "
            f"{query['component']} · {query['metric']} · {query['direction']}"
        )
        meta = esc(
            f"model {query['model']}, corruption {query['corruption']}, {query['n_prompts']} "
            f"prompts; parameters: {query['params_text']}"
        )
        if rows is None:
            cards.append(card(heading, meta, '<p class="note">no effect rows stored</p>'))
            continue
        element = f"patch-{query['query_id']}"
        extent = extents[(query["metric"], query["direction"])]
        spec = charts.heatmap(query, rows, extent, position_labels(store, query["run_id"]))
        chart = page.chart(element, spec, "heatmap", query["query_id"])
        what, sign = charts.signed_meaning(query["direction"])
        legend = (
            f'<p class="legend">Colour: {esc(what)} on a scale of ±{extent:.3g} shared by every '
            f"{esc(query['metric'])} {esc(query['direction'])} chart; {esc(sign)}.</p>"
        )
        cards.append(card(heading, meta, chart + legend))
        contents.append(entry("patching", query["query_id"], element, heading, rows.height))
    page.section(
        "patching", "Patching effects",
        "Each cell is one patched component (a head, or a layer at one position). Colour is its "
        "signed effect, 0 (white) where patching changes nothing: the normalized effect (m − "
        "m_corrupted) / (m_clean − m_corrupted) when denoising, normalized − 1 when noising, "
        "so ±1 means the component alone carries the whole clean–corrupted difference. Charts "
        "of one metric and direction share one scale, so equal colours are equal effects. "
        "Importance (|normalized| denoising, |1 − normalized| noising) ranks the components; "
        "hover a cell for it, the patched run's metric (value), the normalized effect and the "
        "query's parameters. Grey cells have no defined normalized effect (n/a).",
        cards,
        "No patching queries for these runs; run actstore patch STORE --run R --component "
        "head.",
    )  # fmt: skip


def overlap_section(
    page: Page, store: Store, runs: list[int], heads: ov.Selection, edges: ov.Selection,
    contents: list[dict],
) -> None:  # fmt: skip
    cards = []
    for i, group in enumerate(data.overlap_groups(store, runs, heads, edges)):
        items = "heads" if group.by == "head" else "edges"
        if group.note is not None:
            cards.append(card(group.title, "", f'<p class="note">{esc(group.note)}</p>'))
            continue
        element = f"overlap-{i + 1}"
        sizes = ov.sizes(group.pairs, group.selection)
        spec = charts.overlap_matrix(group.pairs, items, sizes)
        chart = page.chart(element, spec, "overlap", i + 1)
        pairs = group.pairs.filter(pl.col("source_a") < pl.col("source_b"))
        listing = table(
            pairs,
            {"run_a": "run A", "task_a": "task A", "source_a": "source A", "run_b": "run B",
             "task_b": "task B", "source_b": "source B", "n_a": "|A|", "n_b": "|B|",
             "intersection": "|A∩B|", "iou": "IoU", "universe": "universe",
             "frac_of_a": "|A∩B|/|A|", "frac_of_b": "|A∩B|/|B|",
             "expected": "expected by chance", "p_value": "hypergeometric p",
             "shared": f"shared {items}"},
            numbers=("run_a", "run_b", "source_a", "source_b", "n_a", "n_b", "intersection",
                     "iou", "universe", "frac_of_a", "frac_of_b", "expected", "p_value"),
        )  # fmt: skip
        meta = esc(ov.compared(group.pairs))
        warning = ov.few_items(group.pairs, group.selection)
        if warning:
            listing = f'<p class="note warning">{esc(warning)}</p>' + listing
        cards.append(card(group.title, meta, chart + listing))
        contents.append(entry("overlap", i + 1, element, group.title, group.pairs.height))
    page.section(
        "overlap", "Overlap across runs",
        "Sets are compared like with like, as actstore overlap does: head sets only between "
        "patching queries of one component, metric, direction and window, edge sets only "
        "between score sets of one method, metric and steps, and only across runs of one "
        "corruption; each run contributes its newest set of the setting. Cells show IoU "
        "|A∩B|/|A∪B| with |A∩B| of |A| in brackets, the title the sets' size k and the "
        "universe they were drawn from; the diagonal (a set with itself) is masked. p is "
        "P(X ≥ |A∩B|) for X ~ Hypergeometric(N, |A|, |B|), N all heads of the model or all "
        "scored edges.",
        cards,
        "No head or edge sets for these runs.",
    )  # fmt: skip


def faithfulness_section(
    page: Page, store: Store, runs: list[int], circuits: pl.DataFrame, contents: list[dict]
) -> None:
    cards = []
    for score_id, curve in data.faithfulness_curves(store, runs).items():
        chosen = circuits.filter(pl.col("score_id") == score_id)
        prov = lookups.provenance(store, score_id)
        n_scored = store._trusted_query(
            "SELECT count(*) FROM edge_scores WHERE score_id = ?", [score_id]
        ).item()
        heading = f"score set {score_id} · run {prov['run_id']} {prov['task']}"
        marked = ", ".join(
            f"circuit {c} ({n} edges, {f:.4g})"
            for c, n, f in chosen.select("circuit_id", "n_edges", "faithfulness").iter_rows()
        )
        meta = esc(f"{lookups.caption(prov)}; marked: {marked or 'no stored circuit'}")
        element = f"faithfulness-{score_id}"
        spec = charts.faithfulness(curve, chosen, n_scored)
        cards.append(card(heading, meta, page.chart(element, spec, "faithfulness", score_id)))
        contents.append(entry("faithfulness", score_id, element, heading, curve.height))
    page.section(
        "faithfulness", "Faithfulness",
        "Faithfulness (m(C) − m(corrupted)) / (m(model) − m(corrupted)) of the circuit made of "
        "the top-n edges by |score| (every other edge carrying its corrupted value), against "
        "its number of edges after pruning. Diamonds mark the stored circuits.",
        cards,
        "No faithfulness curves for these runs; run actstore circuit STORE --scores ID "
        "--faithfulness 0.85.",
    )  # fmt: skip


def circuits_section(page: Page, store: Store, circuits: pl.DataFrame, contents: list[dict]):
    cards = []
    for c in circuits.to_dicts():
        nodes, edges = data.circuit_graph(store, c["circuit_id"])
        heading = (
            f"circuit {c['circuit_id']} · run {c['run_id']} {c['task']} · {c['method']} · "
            f"{c['n_edges']} edges · faithfulness {charts.number(c['faithfulness'])}"
        )
        meta = esc(
            f"from score set {c['score_id']} ({c['n_scored']} scored edges, top {c['top_n']} "
            f"before pruning), metric {c['metric']}, {c['n_heads']} heads; parameters: "
            f"{c['params_text']}"
        )
        element = f"circuit-{c['circuit_id']}"
        roles = charts.edge_roles(c["clean_metric"], c["corrupted_metric"])
        spec = charts.circuit_graph(nodes, edges, c["n_layers"], c["heads_per_layer"], roles)
        chart = page.chart(element, spec, "circuit", c["circuit_id"])
        top = edges.head(charts.TOP_EDGES).with_columns(
            pl.int_range(1, pl.len() + 1).alias("rank"),
            pl.when(pl.col("score") >= 0).then(pl.lit(charts.role_meaning(roles[True][0])))
            .when(pl.col("score") < 0).then(pl.lit(charts.role_meaning(roles[False][0])))
            .otherwise(pl.lit(roles[None][0])).alias("role"),
        )  # fmt: skip
        listing = (
            f'<div class="beside"><p class="legend">top {top.height} of {edges.height} edges by '
            "|score|</p>"
            + table(top, {"rank": "#", "edge": "edge", "score": "score", "role": "the edge"},
                    numbers=("rank", "score"))
            + "</div>"
        )  # fmt: skip
        legend = (
            f'<p class="legend">{esc(sign_convention(c))} Hover a node to show only its edges.</p>'
        )
        cards.append(card(heading, meta, f'<div class="row">{chart}{listing}</div>{legend}'))
        contents.append(
            entry("circuit", c["circuit_id"], element, heading, edges.height, nodes.height)
        )
    page.section(
        "circuits", "Circuits",
        "Each circuit as a layered graph: input, then each layer's attention heads (stacked) "
        "and MLP (the bottom row), then the logits. Line width is |score|; colour says what the "
        "score's sign means (under EAP's convention a score is the metric's change when the "
        "edge alone is corrupted, so the sign that carries the behaviour depends on the "
        "metric). An edge into a head meets it at its query (above), key (middle) or value "
        "(below) input; an edge that skips columns bows away from the middle, so no two share "
        "a path. Hover a node to show only its edges, an edge for its name and score; the "
        "table lists the strongest edges.",
        cards,
        "No circuits for these runs; run actstore circuit STORE --scores ID --edges N.",
    )  # fmt: skip


def sign_convention(c: dict) -> str:
    """What an edge's score sign means for this circuit, with the numbers that decide it."""
    rule = (
        "An edge's score is EAP's estimate of m(clean run with only that edge corrupted) − "
        "m(clean run)"
    )
    clean, corrupted = c["clean_metric"], c["corrupted_metric"]
    if clean is None or corrupted is None or clean == corrupted:
        return f"{rule}."
    lower = corrupted < clean
    return (
        f"{rule}: {c['metric']} is {'lower' if lower else 'higher'} on the corrupted run "
        f"({charts.number(clean)} clean, {charts.number(corrupted)} corrupted), so a "
        f"{'negative' if lower else 'positive'} score (blue) means the edge carries the "
        f"behaviour and a {'positive' if lower else 'negative'} one (red) that it works "
        "against it. Line width is |score|."
    )


VERDICT_CLASS = {True: "illusion", False: "clear", None: "unknown"}


def subspace_section(page: Page, store: Store, runs: list[int], contents: list[dict]) -> None:
    cards = []
    reports = data.subspace_reports(store, runs)
    for (query_id,), rows in reports.partition_by("query_id", as_dict=True).items():
        first = rows.row(0, named=True)
        flag = first["illusion"]
        split = dict(zip(rows["component"], rows["norm_sq"], strict=True))
        parts = (
            f" · ‖v_row‖² = {charts.number(split['row'])}, ‖v_null‖² = "
            f"{charts.number(split['null'])}"
            if "row" in split
            else " · no rowspace/nullspace split (no reading map)"
        )
        verdict = (
            f'<p><span class="verdict {VERDICT_CLASS[flag]}">'
            f"{esc(lookups.illusion_verdict(flag))}</span>{esc(parts)}</p>"
        )
        where = f"{first['hook']}" + (f" head {first['head']}" if first["head"] is not None
                                      else "")  # fmt: skip
        heading = f"subspace query {query_id} · run {first['run_id']} {first['task']} · {where}"
        meta = esc(
            f"basis {first['source']}, reader {first['reader'] or 'the hook’s own map'}, "
            f"positions {first['pos']}, {first['direction']}, {first['metric']}, "
            f"{first['n_prompts']} {first['split']} prompts; parameters: "
            f"{data.params_text(first['params'])}"
        )
        listing = table(
            rows,
            {"component": "component", "dim": "dim", "norm_sq": "norm²",
             "variance": "variance", "value": "value (metric, patched)",
             "normalized": "normalized", "effect": "effect"},
            numbers=("dim", "norm_sq", "variance", "value", "normalized", "effect"),
        )  # fmt: skip
        element = f"subspace-{query_id}"
        chart = page.chart(element, charts.subspace_bars(rows), "subspace", query_id)
        cards.append(card(heading, meta, verdict + chart + listing))
        contents.append(entry("subspace", query_id, element, heading, rows.height))
    page.section(
        "subspace", "Subspace patching",
        "Patching a direction v, its rowspace part (what the reading map sees) and its nullspace "
        "part (what it cannot see), and the whole activation for scale. v is flagged as an "
        "illusion when it moves the output, its rowspace part does at most half as much and "
        "that part is dormant (low variance): the effect then runs through a pathway the "
        "direction does not stand for. Columns: norm² is the part's share of ‖v‖²; variance "
        "the activations' variance along the part (per dimension; low means dormant); value "
        "the metric (e.g. logit difference) of the run with the part patched, mean over the "
        "prompts; normalized that value normalised as (m − m_corrupted) / (m_clean − "
        "m_corrupted); effect the normalized value minus the unpatched run's.",
        cards,
        "No subspace queries for these runs; run actstore subspace STORE --run R --hook H "
        "--basis mean-diff.",
    )  # fmt: skip


def report(
    store: Store,
    out: str | Path,
    runs: list[int] | None = None,
    top_k: int | None = None,
    top_frac: float | None = None,
    edge_top_k: int | None = None,
    edge_top_frac: float | None = None,
) -> pl.DataFrame:
    """Write one self-contained HTML page about the store (or the given runs) to `out`;
    returns one row per chart: its section, source id, element id, title and data elements.

    Head sets for overlap are the top_k or top_frac heads (default top 2%), edge sets the
    edge_top_k or edge_top_frac edges (default top 2%)."""
    heads = ov.choose("head", top_k, top_frac)
    edges = ov.choose("edge", edge_top_k, edge_top_frac)
    chosen = data.chosen_runs(store, runs)
    path = Path(out)
    refuse_inside_store(path, "-o")
    if not path.parent.is_dir():
        raise ActstoreError(f"cannot write {out}: no directory {path.parent}; create it first")
    models = store._trusted_query(
        "SELECT DISTINCT model FROM runs WHERE run_id IN (SELECT unnest(?)) ORDER BY 1", [chosen]
    )["model"].to_list()
    now = dt.datetime.now(dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    tasks = store._trusted_query(
        "SELECT task FROM runs WHERE run_id IN (SELECT unnest(?)) GROUP BY task "
        "ORDER BY min(run_id)",
        [chosen],
    )["task"].to_list()
    about = f"{', '.join(tasks)} on {', '.join(models)}" if tasks else "no runs yet"
    page = Page(
        title=f"actstore report: {about}",
        subtitle=f"{store.path} · model {', '.join(models) or 'none'} · runs "
        f"{', '.join(map(str, chosen)) or 'none'} · written {now}",
    )
    contents: list[dict] = []
    circuits = data.circuits(store, chosen)
    runs_section(page, store, chosen)
    patching_section(page, store, chosen, contents)
    attention_section(page, store, chosen)
    overlap_section(page, store, chosen, heads, edges, contents)
    faithfulness_section(page, store, chosen, circuits, contents)
    circuits_section(page, store, circuits, contents)
    subspace_section(page, store, chosen, contents)
    footer = esc(
        f"actstore {version('actstore')}; every number is read from {store.path} "
        "(catalog.duckdb): reproduce any of them with actstore sql. Opens offline: scripts and "
        "styles are part of this file."
    )
    text = page.html(footer)
    write_atomically(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))
    return pl.DataFrame(contents, schema=CONTENTS_SCHEMA)
