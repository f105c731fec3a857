"""Vega-Lite specifications (built with Altair) for the report's interactive charts.

Vega renders each datum as its own SVG element with a hover tooltip, so a heatmap cell, a
circuit node or edge is one element of the page: analysts hover it, tests count it. Tooltips
show numbers as text written here with 6 significant digits, so that what an analyst reads is
exactly what the catalog holds to that precision, in every browser locale.
"""

from __future__ import annotations

import math
from typing import Any

import altair as alt
import polars as pl

from actstore.core.names import HEAD, INPUT, LOGITS, MLP, NODE_KINDS
from queries.analysis.lookups import asked_roles

MISSING = "n/a"
INVALID_COLOUR = "#d9d9d9"
NEGATIVE, POSITIVE = "#c0392b", "#2166ac"


def number(value: float | None) -> str:
    """How the report writes a stored number: 6 significant digits, `n/a` for NULL."""
    return MISSING if value is None else f"{value:.6g}"


def _finish(chart: alt.TopLevelMixin) -> dict[str, Any]:
    """One look for every chart; a NULL colour value is drawn grey rather than dropped."""
    with alt.data_transformers.disable_max_rows():
        return (
            chart.configure_scale(
                invalid={"color": {"value": INVALID_COLOUR}, "strokeWidth": {"value": 1}}
            )
            .configure_view(stroke=None)
            .configure_axis(labelFontSize=11, titleFontSize=12)
            .to_dict()
        )


def _tooltips(fields: dict[str, str | None]) -> list[alt.Tooltip]:
    """Hover fields, encoded field -> title (None keeps the field's name), in display order."""
    return [alt.Tooltip(f) if t is None else alt.Tooltip(f, title=t) for f, t in fields.items()]


def _step(n: int, largest: int = 36, smallest: int = 12, budget: int = 640) -> int:
    """Pixels per band: large cells for small grids, the chart within ~budget pixels."""
    return max(smallest, min(largest, budget // max(n, 1)))


# What the colour of a patching cell is, per direction: a signed effect that is 0 where
# patching changes nothing (denoising: the normalized effect; noising: normalized − 1), and
# what its sign means. Importance (|signed|) ranks; the sign says which way the cell pushes.
SIGNED = {
    "denoise": ("normalized effect",
                "blue (+): patching the clean activation in restores the clean behaviour "
                "(+1: all of it); red (−): it pushes the output further from clean"),
    "noise": ("normalized − 1",
              "red (−): patching the corrupted activation in removes the clean behaviour "
              "(−1: all of it); blue (+): it strengthens the clean behaviour"),
}  # fmt: skip


def signed_meaning(direction: str | None) -> tuple[str, str]:
    """The signed effect's name and what its sign means, for a query's direction."""
    return SIGNED["noise" if direction == "noise" else "denoise"]


def signed_effect(direction: str | None) -> pl.Expr:
    """The cell colour's value: 0 when patching changes nothing, in either direction."""
    return pl.col("normalized") - 1 if direction == "noise" else pl.col("normalized")


def signed_extent(effects: list[pl.DataFrame], direction: str | None) -> float:
    """The largest |signed effect| over the charts that share one colour scale (1 if none)."""
    tops = [e.select(signed_effect(direction).abs().max()).item() for e in effects]
    return max((t for t in tops if t is not None), default=0.0) or 1.0


def heatmap(
    query: dict[str, Any],
    effects: pl.DataFrame,
    extent: float,
    labels: dict[int | str, str] | None = None,
) -> dict[str, Any]:
    """One patching query as a grid coloured by the signed effect on a diverging scale
    centred at 0 and spanning ±extent (shared by every chart of the metric and direction):
    layer × head for `head`, (layer, head) × position for `head-pos`, layer × position
    otherwise. Positions and roles are named by `labels` (actstore.core.roles.position_labels:
    the role and token every prompt has there). Importance, the ranking, is on hover."""
    labels = labels or {}
    direction = query["direction"]
    effects = effects.with_columns(signed_effect(direction).alias("signed"))
    has_head = effects["head"].null_count() < effects.height
    by_role = "role" in effects.columns and effects["role"].null_count() < effects.height
    has_pos = by_role or effects["pos"].null_count() < effects.height
    asked = asked_roles(query)
    roles = [r for r in asked if r in set(effects["role"])] if by_role else []
    names = {str(k): v for k, v in labels.items()}
    rows = effects.with_columns(
        (pl.col("role") if by_role else pl.col("pos").cast(pl.String).fill_null("all"))
        .replace(names)
        .alias("position"),
        pl.col("head").cast(pl.String).fill_null("—").alias("head_label"),
        pl.col("node").fill_null(pl.format("L{}", pl.col("layer"))).alias("row_label"),
    ).to_dicts()
    params = f"query {query['query_id']}: {query['params_text']}"
    for row in rows:
        row["value_text"] = number(row["value"])
        row["normalized_text"] = number(row["normalized"])
        row["importance_text"] = number(row["importance"])
        row["signed_text"] = number(row["signed"])
        row["signed_label"] = "" if row["signed"] is None else f"{row['signed']:+.2f}"
        row["query"] = params
    if has_head and not has_pos:
        x, y, x_title, y_title = "head:O", "layer:O", "head", "layer"
        n_x, y_sort = effects["head"].n_unique(), None
    elif has_head:
        x, y, x_title, y_title = "position:O", "row_label:O", "position", "layer.head"
        n_x = effects["pos"].n_unique()
        order = effects.select("layer", "head", "node").unique().sort("layer", "head")
        y_sort = order["node"].to_list()
    else:
        x, y, x_title, y_title = "position:O", "layer:O", "position", "layer"
        n_x, y_sort = effects["pos"].n_unique(), None
    if by_role:  # each prompt patched at its own position of the role: columns are roles
        n_x = len(roles)
        x_encoding = alt.X(x, title="role", sort=[labels.get(r, r) for r in roles])
    elif x == "position:O":
        numbers = sorted({r["pos"] for r in rows if r["pos"] is not None})
        positions = [labels.get(p, str(p)) for p in numbers]
        positions += ["all"] if any(r["pos"] is None for r in rows) else []
        x_encoding = alt.X(x, title=x_title, sort=positions)
    else:
        x_encoding = alt.X(x, title=x_title)
    n_y = len({r["row_label"] for r in rows})
    fields = {
        "layer:O": "layer", "head_label:N": "head", "position:N": "position",
        "value_text:N": "value", "normalized_text:N": "normalized",
    }  # fmt: skip
    if direction == "noise":  # denoising's signed effect is the normalized effect itself
        fields["signed_text:N"] = signed_meaning(direction)[0]
    tooltip = _tooltips({**fields, "importance_text:N": "importance", "query:N": "query"})
    base = alt.Chart(alt.Data(values=rows)).encode(
        x_encoding.axis(labelAngle=0),
        alt.Y(y, title=y_title, sort=y_sort),
    )
    cells = base.mark_rect(invalid="show", stroke="white", strokeWidth=0.5).encode(
        color=alt.Color(
            "signed:Q",
            title=signed_meaning(direction)[0],
            scale=alt.Scale(scheme="redblue", domain=[-extent, extent], domainMid=0),
            legend=alt.Legend(gradientLength=min(160, 12 * n_y + 40)),
        ),
        tooltip=tooltip,
    )
    chart = cells
    if len(rows) <= 100:
        labels = base.mark_text(fontSize=10).encode(
            text=alt.Text("signed_label:N"),
            color=alt.condition(
                f"datum.signed !== null && abs(datum.signed) > {0.55 * extent}",
                alt.value("white"),
                alt.value("black"),
            ),
        )
        chart = cells + labels
    chart = chart.properties(width={"step": _step(n_x)}, height={"step": _step(n_y, 28)})
    return _finish(chart)


def overlap_matrix(pairs: pl.DataFrame, items: str, sizes: str) -> dict[str, Any]:
    """IoU of every ordered pair of sets on a fixed 0–1 scale; the diagonal (a set with
    itself) is masked; `sizes` (k and the universe) is the chart's title, beside every IoU."""
    labels = {
        (run, source): f"run {run} {task} ({source})"
        for run, task, source in pairs.select("run_a", "task_a", "source_a").iter_rows()
    }
    rows = []
    for r in pairs.to_dicts():
        diagonal = r["source_a"] == r["source_b"]
        rows.append(
            {
                "set_a": labels[(r["run_a"], r["source_a"])],
                "set_b": labels[(r["run_b"], r["source_b"])],
                "iou": None if diagonal else r["iou"],
                "label": "—" if diagonal else f"{r['iou']:.2f} ({r['intersection']} of {r['n_a']})",
                "n_a": r["n_a"],
                "n_b": r["n_b"],
                "universe": r["universe"],
                "intersection": r["intersection"],
                "iou_text": "same set" if diagonal else number(r["iou"]),
                "p_text": "—" if diagonal else number(r["p_value"]),
                "shared": "—" if diagonal else ", ".join(r["shared"]) or "none",
            }
        )
    order = list(labels.values())
    tooltip = _tooltips({
        "set_a:N": "set A", "set_b:N": "set B", "n_a:Q": "|A|", "n_b:Q": "|B|",
        "universe:Q": "universe", "intersection:Q": "|A∩B|", "iou_text:N": "IoU",
        "p_text:N": "hypergeometric p",
        "shared:N": f"shared {items}",
    })  # fmt: skip
    base = alt.Chart(alt.Data(values=rows)).encode(
        alt.X("set_b:N", title="set B", sort=order, axis=alt.Axis(labelAngle=-20)),
        alt.Y("set_a:N", title="set A", sort=order),
        tooltip=tooltip,
    )
    cells = base.mark_rect(invalid="show", stroke="white").encode(
        color=alt.Color("iou:Q", title="IoU", scale=alt.Scale(scheme="viridis", domain=[0, 1]))
    )
    text = base.mark_text(fontSize=11).encode(
        text="label:N",
        color=alt.condition(
            "datum.iou !== null && datum.iou < 0.5", alt.value("white"), alt.value("black")
        ),
    )
    step = _step(len(order), largest=110, smallest=40, budget=560)
    chart = (cells + text).properties(
        width={"step": step}, height={"step": step}, title=alt.Title(sizes, fontSize=12)
    )
    return _finish(chart)


def faithfulness(curve: pl.DataFrame, circuits: pl.DataFrame, n_scored: int) -> dict[str, Any]:
    """Faithfulness against circuit size (symlog axis, so the empty circuit shows), the
    stored circuits marked, reference lines at the full model (1) and 0.85."""
    points = [{**r, "faithfulness_text": number(r["faithfulness"])} for r in curve.to_dicts()]
    marked = [
        {
            "circuit": f"circuit {r['circuit_id']}",
            "n_edges": r["n_edges"],
            "faithfulness": r["faithfulness"],
            "faithfulness_text": number(r["faithfulness"]),
        }
        for r in circuits.to_dicts()
    ]
    ticks = [0] + [2**i for i in range(max(n_scored, 1).bit_length())] + [n_scored]
    x = alt.X(
        "n_edges:Q", title=f"edges in circuit (of {n_scored} scored)",
        scale=alt.Scale(type="symlog", domain=[0, n_scored]),
        axis=alt.Axis(values=sorted(set(ticks)), labelOverlap=True),
    )  # fmt: skip
    y = alt.Y("faithfulness:Q", title="faithfulness")
    line = alt.Chart(alt.Data(values=points)).mark_line(point=True).encode(
        x, y,
        tooltip=_tooltips({"top_n:Q": "top n by |score|", "n_edges:Q": "edges after pruning",
                           "faithfulness_text:N": "faithfulness"}),
    )  # fmt: skip
    chosen = alt.Chart(alt.Data(values=marked)).encode(
        x, y,
        tooltip=_tooltips({"circuit:N": None, "n_edges:Q": "edges",
                           "faithfulness_text:N": "faithfulness"}),
    )  # fmt: skip
    references = (
        alt.Chart(alt.Data(values=[{"y": 1.0, "what": "full model"}, {"y": 0.85, "what": "0.85"}]))
        .mark_rule(strokeDash=[4, 4], color="#888")
        .encode(y="y:Q", tooltip=["what:N"])
    )
    layers = alt.layer(
        references,
        line,
        chosen.mark_point(shape="diamond", size=160, filled=True, color=NEGATIVE),
        chosen.mark_text(dy=-14, color=NEGATIVE, fontWeight="bold").encode(text="circuit:N"),
    )
    return _finish(layers.properties(width=560, height=300))


def node_positions(nodes: pl.DataFrame, n_layers: int, n_heads: int) -> pl.DataFrame:
    """Columns input, attn 0, mlp 0, …, logits left to right; heads stacked by index, the MLPs
    on a row of their own below them, input and logits level with the heads' middle."""
    middle = (n_heads - 1) / 2
    return nodes.with_columns(
        pl.when(pl.col("kind") == INPUT).then(0)
        .when(pl.col("kind") == HEAD).then(2 * pl.col("layer") + 1)
        .when(pl.col("kind") == MLP).then(2 * pl.col("layer") + 2)
        .otherwise(2 * n_layers + 1).alias("x"),
        pl.when(pl.col("kind") == HEAD).then(pl.col("head").cast(pl.Float64))
        .when(pl.col("kind") == MLP).then(float(n_heads))
        .otherwise(middle).alias("y"),
    )  # fmt: skip


QKV_OFFSET = {"q": -0.22, "k": 0.0, "v": 0.22}
BOW = 0.3  # rows an edge spanning two columns bows away from the straight line; grows with span
TOP_EDGES = 15  # edges listed in the table beside a circuit's graph


def edge_path(
    start: tuple[float, float], end: tuple[float, float], middle: float
) -> list[tuple[float, float]]:
    """An edge's three spline points. An edge between neighbouring columns is straight (it can
    pass no other node); a longer one bows away from the graph's middle row by its span, so
    that it never runs over the nodes it skips nor along a shorter edge."""
    (x1, y1), (x2, y2) = start, end
    span = x2 - x1
    if span <= 1:
        return [start, ((x1 + x2) / 2, (y1 + y2) / 2), end]
    away = 1.0 if (y1 + y2) / 2 >= middle else -1.0
    return [start, ((x1 + x2) / 2, (y1 + y2) / 2 + away * BOW * math.sqrt(span - 1)), end]


def edge_roles(clean: float | None, corrupted: float | None) -> dict[bool | None, tuple[str, str]]:
    """Per score sign (score ≥ 0, or None for no score), its legend label and colour. EAP's
    score approximates m(clean run with the edge corrupted) − m(clean run), so an edge carries
    the behaviour (blue, as a heatmap cell that restores it) when its score points from the
    clean metric toward the corrupted one, and works against it (red) otherwise."""
    none = ("no score", INVALID_COLOUR)
    if clean is None or corrupted is None or clean == corrupted:
        return {False: ("score < 0", NEGATIVE), True: ("score ≥ 0", POSITIVE), None: none}
    carries = ("carries the behaviour", POSITIVE)
    opposes = ("works against it", NEGATIVE)
    negative, positive = (carries, opposes) if corrupted < clean else (opposes, carries)
    return {
        False: (f"score < 0: {negative[0]}", negative[1]),
        True: (f"score ≥ 0: {positive[0]}", positive[1]),
        None: none,
    }


def role_meaning(label: str) -> str:
    """A sign's legend label without its `score < 0: ` part: what the edge does."""
    return label.split(": ", 1)[-1]


def circuit_graph(
    nodes: pl.DataFrame,
    edges: pl.DataFrame,
    n_layers: int,
    n_heads: int,
    roles: dict[bool | None, tuple[str, str]],
) -> dict[str, Any]:
    """A circuit as a layered graph: one node per component, one curve per edge, its width by
    |score| and colour by what its sign means (`roles`); edges into a head meet it at q, k or
    v (top to bottom). Hovering a node fades every edge but its own."""
    placed = node_positions(nodes, n_layers, n_heads)
    where = {n: (x, y) for n, x, y in placed.select("node", "x", "y").iter_rows()}
    middle = (n_heads - 1) / 2
    colour = dict(roles.values())
    points, lowest, highest = [], -0.5, n_heads + 0.5
    for e in edges.to_dicts():
        (x1, y1), (x2, y2) = where[e["src"]], where[e["dst"]]
        end = (x2, y2 + QKV_OFFSET.get(e["qkv"] or "", 0.0))
        sign = None if e["score"] is None else e["score"] >= 0
        for i, (x, y) in enumerate(edge_path((x1, y1), end, middle)):
            lowest, highest = min(lowest, y - 0.3), max(highest, y + 0.3)
            points.append({
                "x": x, "y": y, "i": i, "edge": e["edge"], "src": e["src"], "dst": e["dst"],
                "score": e["score"], "score_text": number(e["score"]),
                "magnitude": None if e["score"] is None else abs(e["score"]),
                "role": roles[sign][0],
            })  # fmt: skip
    shown = [r for r in colour if any(p["role"] == r for p in points)]
    columns = [INPUT] + [f"{k} {layer}" for layer in range(n_layers) for k in ("attn", MLP)]
    columns.append(LOGITS)
    label_expr = f"{columns!r}[datum.value]"
    x = alt.X(
        "x:Q", title=None, scale=alt.Scale(domain=[-0.5, len(columns) - 0.5], nice=False),
        axis=alt.Axis(values=list(range(len(columns))), labelExpr=label_expr, grid=False,
                      orient="top", labelAngle=0),
    )  # fmt: skip
    y = alt.Y(
        "y:Q", title=None, axis=None,
        scale=alt.Scale(domain=[highest, lowest], nice=False, zero=False),
    )  # fmt: skip
    focus = alt.selection_point(
        name="focus", fields=["node"], on="pointerover", clear="pointerout", empty=False
    )
    width = alt.StrokeWidth(
        "magnitude:Q",
        title="|score|",
        scale=alt.Scale(type="sqrt", range=[0.75, 9]),
        legend=alt.Legend(tickCount=3),
    )
    role = alt.Color(
        "role:N", title="edge (EAP sign)",
        scale=alt.Scale(domain=shown, range=[colour[r] for r in shown]),
        legend=alt.Legend(labelLimit=320, symbolOpacity=1, symbolStrokeWidth=3),
    )  # fmt: skip
    tooltip = _tooltips({"edge:N": None, "score_text:N": "score", "role:N": "sign"})
    edge_data = alt.Data(values=points)
    edge_marks = alt.Chart(edge_data).mark_line(interpolate="basis").encode(
        x, y, detail="edge:N", order="i:Q", strokeWidth=width, color=role, tooltip=tooltip,
        opacity=alt.condition("length(data('focus_store'))", alt.value(0.12), alt.value(0.7)),
    ).properties(name="edges")  # fmt: skip
    touching = alt.Chart(edge_data).mark_line(interpolate="basis", opacity=1).encode(
        x, y, detail="edge:N", order="i:Q", strokeWidth=width, color=role, tooltip=tooltip,
    ).transform_fold(["src", "dst"], as_=["end", "node"]).transform_filter(focus).properties(
        name="focused"
    )  # fmt: skip
    node_data = alt.Data(values=placed.to_dicts())
    node_marks = alt.Chart(node_data).mark_point(
        filled=True, size=260, opacity=1, stroke="white", strokeWidth=1.5
    ).encode(
        x, y,
        shape=alt.Shape("kind:N", title="node",
                        scale=alt.Scale(domain=list(NODE_KINDS),
                                        range=["triangle-right", "circle", "square", "diamond"])),
        fill=alt.value("#444"),
        tooltip=_tooltips({"node:N": None}),
    ).add_params(focus).properties(name="nodes")  # fmt: skip
    labels = alt.Chart(node_data).mark_text(dy=-14, fontSize=10).encode(x, y, text="node:N")
    chart = alt.layer(edge_marks, touching, node_marks, labels).properties(
        width=max(360, 72 * len(columns)), height=max(200, 52 * (highest - lowest))
    )
    return _finish(chart.configure_legend(orient="bottom", direction="horizontal"))


def subspace_bars(report: pl.DataFrame) -> dict[str, Any]:
    """One subspace query: the effect of patching v, its rowspace and nullspace parts, and
    the whole activation, as bars; hover shows every column of the report row."""
    rows = []
    for r in report.to_dicts():
        rows.append(
            {
                "component": r["component"],
                "effect": r["effect"],
                **{f"{k}_text": number(r[k]) for k in
                   ("norm_sq", "variance", "value", "normalized", "effect")},
                "dim": r["dim"],
            }
        )  # fmt: skip
    order = ["v", "row", "null", "full"]
    chart = alt.Chart(alt.Data(values=rows)).mark_bar().encode(
        alt.X("component:N", sort=order, title=None, axis=alt.Axis(labelAngle=0)),
        alt.Y("effect:Q", title="effect (normalized, minus unpatched)"),
        color=alt.Color("component:N", sort=order, legend=None,
                        scale=alt.Scale(domain=order,
                                        range=["#555", POSITIVE, "#999", "#bbb"])),
        tooltip=_tooltips({"component:N": None, "dim:Q": None, "norm_sq_text:N": "norm²",
                           "variance_text:N": "variance", "value_text:N": "value",
                           "normalized_text:N": "normalized", "effect_text:N": "effect"}),
    )  # fmt: skip
    return _finish(chart.properties(width=260, height=200))
