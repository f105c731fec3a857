"""PNG plots of stored results: head-effect and position × layer heatmaps, overlap matrices,
faithfulness curves. Each has a title, axis labels, a colour bar where colour carries a value,
and a caption giving the provenance (model, task, corruption, metric, query id).

matplotlib is imported inside the functions with the Agg backend, so that reading a store never
pays for it and no display is needed. Figures are written at a fixed pixel size (`size`), not
cropped, so that a caller (and a test) knows the image's dimensions.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import numpy as np
import polars as pl

from actstore.core.choices import PLOTS
from actstore.core.errors import ActstoreError, UsageError
from actstore.core.names import head_node
from actstore.core.output import refuse_inside_store, write_atomically
from actstore.core.roles import position_labels
from actstore.core.store import Store
from queries.analysis import lookups
from queries.analysis import overlap as ov

SIZE = (960, 720)
DPI = 100


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _figure(size: tuple[int, int]):
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI)
    return plt, fig, ax


AXES_KEY = "actstore:axes"  # the PNG text chunk holding the rendered axes (rendered_axes)


def _axes_record(fig: Any) -> str:
    """Every axes of the drawn figure as JSON: title, labels, scales, limits and the colour
    limits of its images, so that a reader (and a test) can check what the PNG shows."""
    fig.canvas.draw()
    record = []
    for ax in fig.axes:
        images = [im.get_clim() for im in ax.get_images()]
        record.append({
            "title": ax.get_title(), "xlabel": ax.get_xlabel(), "ylabel": ax.get_ylabel(),
            "xscale": ax.get_xscale(), "yscale": ax.get_yscale(),
            "xlim": [float(v) for v in ax.get_xlim()], "ylim": [float(v) for v in ax.get_ylim()],
            "clim": [float(v) for v in images[0]] if images else None,
        })  # fmt: skip
    return json.dumps(record)


def rendered_axes(path: str | Path) -> list[dict[str, Any]]:
    """The axes a plot PNG was drawn with (titles, scales, limits, colour limits)."""
    from PIL import Image

    with Image.open(path) as image:
        return json.loads(image.text[AXES_KEY])


def _save(plt: Any, fig: Any, note: str, out: str | Path) -> None:
    """Caption at the bottom, layout fitted inside the fixed canvas, the axes recorded in the
    PNG (`rendered_axes`), written atomically."""
    fig.text(0.5, 0.015, note, ha="center", va="bottom", fontsize=8, wrap=True, color="0.25")
    fig.tight_layout(rect=(0, 0.06, 1, 1))
    try:
        write_atomically(
            out,
            lambda tmp: fig.savefig(
                tmp, dpi=DPI, format="png", metadata={AXES_KEY: _axes_record(fig)}
            ),
        )
    finally:
        plt.close(fig)


def _heatmap(ax: Any, fig: Any, grid: np.ndarray, cmap: str, label: str, bounds: tuple):
    """Colour over `bounds` (vmin, vmax); NaN cells are drawn light grey."""
    import matplotlib

    colours = matplotlib.colormaps[cmap].with_extremes(bad="0.88")
    image = ax.imshow(np.ma.masked_invalid(grid), cmap=colours, vmin=bounds[0], vmax=bounds[1],
                      aspect="auto")  # fmt: skip
    bar = fig.colorbar(image, ax=ax)
    bar.set_label(label)
    return image


def _bounds(grid: np.ndarray, symmetric: bool) -> tuple[float, float]:
    """Symmetric around 0 for signed values, else 0 to the largest finite value."""
    finite = grid[np.isfinite(grid)]
    top = float(np.abs(finite).max()) if finite.size else 0.0
    top = top or 1.0
    return (-top, top) if symmetric else (0.0, top)


def _annotate(
    ax: Any, grid: np.ndarray, bounds: tuple[float, float], texts: list[list[str]] | None = None
) -> None:
    """Write each cell's value in it when the grid is small enough to read; white text on the
    saturated end of the colour scale."""
    rows, cols = grid.shape
    if rows * cols > 400:
        return
    lo, hi = bounds
    for i in range(rows):
        for j in range(cols):
            value = grid[i, j]
            text = texts[i][j] if texts else ("–" if not np.isfinite(value) else f"{value:.2f}")
            if not np.isfinite(value):
                dark = False
            elif lo < 0:  # diverging: saturated at both ends
                dark = abs(value) > 0.6 * hi
            else:  # viridis-like: dark at the low end
                dark = value < lo + 0.5 * (hi - lo)
            ax.text(j, i, text, ha="center", va="center", fontsize=9,
                    color="white" if dark else "black")  # fmt: skip


def effects_frame(store: Store, query_id: int) -> tuple[pl.DataFrame, dict[str, Any]]:
    """A patching query's effects with the value plotted: the importance for noising and for
    KL (where the signed normalised effect sits near 1 or carries no sign, so that the heads
    that matter would not stand out), the signed normalised effect otherwise, the raw metric
    where no normalised effect exists."""
    prov = lookups.provenance(store, query_id)
    if prov["kind"] != "patch":
        raise UsageError(
            f"query {query_id} is a {prov['kind']!r} query, not a patch query; plot effects "
            "takes a patch query id (see: select * from queries where kind = 'patch')"
        )
    df = store._trusted_query(
        "SELECT * FROM patch_effects WHERE query_id = ? ORDER BY layer, head, pos", [query_id]
    )
    if "role" not in df.columns:  # a catalog from before roles, read as it is
        df = df.with_columns(pl.lit(None, dtype=pl.String).alias("role"))
    df = df.select("layer", "head", "pos", "role", "metric", "value", "normalized", "importance")
    if df.is_empty():
        raise ActstoreError(f"patch query {query_id} has no effect rows; rerun actstore patch")
    if df["normalized"].null_count() == df.height:
        column = "value"
    elif prov["direction"] == "noise" or prov["metric"] == "kl":
        column = "importance"
    else:
        column = "normalized"
    return df.with_columns(pl.col(column).alias("plotted")), {**prov, "plotted": column}


PLOTTED_LABELS = {
    "normalized": "normalized effect ({metric})",
    "importance": "importance ({metric}, {rule})",
    "value": "{metric} of the patched run",
}


def plot_effects(
    store: Store, query_id: int, out: str | Path, size: tuple[int, int] = SIZE
) -> pl.DataFrame:
    """Heatmap of one patching query: layer × head for per-head effects, position × layer
    for per-position effects, (layer, head) × position when both."""
    df, prov = effects_frame(store, query_id)
    has_head = df["head"].null_count() < df.height
    by_role = df["role"].null_count() < df.height
    has_pos = by_role or df["pos"].null_count() < df.height
    layers = sorted(df["layer"].unique().to_list())
    # a role query's columns are its roles, in the order asked (positions differ by prompt)
    where = df["role"].to_list() if by_role else df["pos"].to_list()
    if by_role:
        asked = lookups.asked_roles(prov)
        places = [r for r in asked if r in set(where)] + sorted(set(where) - set(asked))
        col_label = "role"
    else:
        places = sorted(set(where), key=lambda p: (p is None, p))
        col_label = "position"
    if has_head and not has_pos:
        rows, cols = layers, sorted(df["head"].unique().to_list())
        row_key, col_key = df["layer"].to_list(), df["head"].to_list()
        row_label, col_label, row_names = "layer", "head", [str(r) for r in rows]
        what = "per-head patching effect (layer × head)"
    elif has_head:
        rows = sorted({(r["layer"], r["head"]) for r in df.select("layer", "head").to_dicts()})
        rows_dicts = df.select("layer", "head").to_dicts()
        cols, col_key = places, where
        row_key = [(r["layer"], r["head"]) for r in rows_dicts]
        row_label = "head"
        row_names = [head_node(layer, head) for layer, head in rows]
        what = f"per-head, per-{col_label} patching effect"
    else:
        rows, cols = layers, places
        row_key, col_key = df["layer"].to_list(), where
        row_label, row_names = "layer", [str(r) for r in rows]
        what = f"patching effect ({col_label} × layer)"
    grid = np.full((len(rows), len(cols)), np.nan)
    row_index = {r: i for i, r in enumerate(rows)}
    col_index = {c: j for j, c in enumerate(cols)}
    for r, c, v in zip(row_key, col_key, df["plotted"].to_list(), strict=True):
        grid[row_index[r], col_index[c]] = np.nan if v is None else v
    plt, fig, ax = _figure(size)
    rule = "|1 − normalized|" if prov["direction"] == "noise" else "|normalized|"
    label = PLOTTED_LABELS[prov["plotted"]].format(metric=df["metric"][0], rule=rule)
    signed = prov["plotted"] == "normalized"
    bounds = _bounds(grid, symmetric=signed)
    _heatmap(ax, fig, grid, "RdBu_r" if signed else "viridis", label, bounds)
    _annotate(ax, grid, bounds)
    if has_pos:  # positions and roles with the role and the token every prompt has there
        named = position_labels(store, prov["run_id"])
        ax.set_xticks(range(len(cols)), ["all" if c is None else named.get(c, str(c))
                                         for c in cols])  # fmt: skip
        if any(named.get(c, str(c)) != str(c) for c in cols if c is not None):
            plt.setp(ax.get_xticklabels(), rotation=45, ha="right")
    else:
        ax.set_xticks(range(len(cols)), [str(c) for c in cols])
    ax.set_yticks(range(len(rows)), row_names)
    ax.set_xlabel(col_label)
    ax.set_ylabel(row_label)
    ax.set_title(f"{prov['task']}: {what}")
    _save(plt, fig, lookups.caption(prov), out)
    return df


IOU_BOUNDS = (0.0, 1.0)  # IoU's whole range: one colour means one IoU in every plot


def overlap_grid(df: pl.DataFrame) -> tuple[list[str], np.ndarray, tuple[float, float]]:
    """Labels, the IoU matrix with its trivial diagonal masked (NaN), and the colour bounds:
    always 0 to 1, so that 0.3 and 0.6 never share a colour."""
    labels, iou = ov.matrix(df, "iou")
    grid = np.array([[np.nan if v is None else v for v in row] for row in iou], dtype=float)
    np.fill_diagonal(grid, np.nan)
    return labels, grid, IOU_BOUNDS


def plot_overlap(
    store: Store,
    runs: list[int] | None,
    selection: ov.Selection,
    out: str | Path,
    size: tuple[int, int] = SIZE,
    queries: list[int] | None = None,
    **filters: Any,
) -> pl.DataFrame:
    """IoU matrix of the runs' head or edge sets (diagonal masked: a set against itself says
    nothing), each cell with IoU, |A∩B| and p; the shared heads or edges listed beside it.
    Returns the overlap rows with a `shared` column (the items of A∩B)."""
    df = ov.with_shared(store, ov.overlap(store, runs, selection, queries, **filters), selection)
    labels, grid, bounds = overlap_grid(df)
    _, shared = ov.matrix(df, "intersection")
    _, p_values = ov.matrix(df, "p_value")
    _, sizes = ov.matrix(df, "n_a")
    texts = [
        [
            f"{sizes[i][j]} {selection.by}s" if i == j
            else _cell_text(grid[i, j], shared[i][j], p_values[i][j])
            for j in range(len(labels))
        ]
        for i in range(len(labels))
    ]  # fmt: skip
    plt = _pyplot()
    fig, (ax, side) = plt.subplots(
        1, 2, figsize=(size[0] / DPI, size[1] / DPI), dpi=DPI, width_ratios=(3, 2)
    )
    _heatmap(ax, fig, grid, "viridis", "IoU  |A∩B| / |A∪B|  (diagonal masked)", bounds)
    _annotate(ax, grid, bounds, texts)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set_yticks(range(len(labels)), labels)
    ax.set_xlabel("set B")
    ax.set_ylabel("set A")
    what, size = ov.sizes(df, selection).split(": ", 1)
    ax.set_title(f"Overlap (IoU) of the {what}:\n{size}")
    side.axis("off")
    side.set_title(f"shared {selection.by}s", loc="left")
    side.text(0, 1, _shared_text(df, labels), va="top", ha="left", fontsize=8, wrap=True,
              transform=side.transAxes, family="monospace")  # fmt: skip
    models = store._trusted_query(
        "SELECT DISTINCT model FROM runs WHERE run_id IN (SELECT unnest(?)) ORDER BY 1",
        [df["run_a"].unique().to_list()],
    )["model"].to_list()
    note = (
        f"model {', '.join(models)} · universe {df['universe'][0]} {selection.by}s · "
        f"{ov.compared(df)}"
    )
    warning = ov.few_items(df, selection)
    if warning:
        note = f"{warning}\n{note}"
    _save(plt, fig, note, out)
    return df


SHARED_SHOWN = 12  # items listed per pair; the rest are counted


def _shared_text(df: pl.DataFrame, labels: list[str]) -> str:
    """One block per unordered pair: its labels, |A∩B| and the shared items."""
    blocks = []
    for row in df.filter(pl.col("run_a") < pl.col("run_b")).iter_rows(named=True):
        items = row["shared"]
        shown = ", ".join(items[:SHARED_SHOWN])
        more = f" … and {len(items) - SHARED_SHOWN} more" if len(items) > SHARED_SHOWN else ""
        head = f"run {row['run_a']} {row['task_a']} ∩ run {row['run_b']} {row['task_b']}"
        blocks.append(f"{head} ({len(items)}):\n  {shown or 'none'}{more}")
    return "\n\n".join(blocks)


def _cell_text(iou: float, shared: int, p: float) -> str:
    if not math.isfinite(iou):
        return "–"
    return f"{iou:.2f}\n{shared} shared\np={p:.2g}"


def plot_faithfulness(
    store: Store, score_id: int, out: str | Path, size: tuple[int, int] = SIZE
) -> pl.DataFrame:
    """Faithfulness against circuit size for one score set, with its stored circuits marked."""
    prov = lookups.provenance(store, score_id)
    _check_faithfulness_id(store, prov)
    curve = store._trusted_query(
        "SELECT DISTINCT n_edges, faithfulness FROM faithfulness_curve WHERE score_id = ? "
        "ORDER BY n_edges",
        [score_id],
    )
    circuits = store._trusted_query(
        "SELECT circuit_id, n_edges_stored AS n_edges, faithfulness FROM circuits_v "
        "WHERE score_id = ? ORDER BY n_edges",
        [score_id],
    )
    if curve.is_empty() and circuits.is_empty():
        raise ActstoreError(
            f"score set {score_id} has no faithfulness curve or circuits yet; run actstore "
            f"circuit {store.path} --scores {score_id} --faithfulness 0.85, then plot again"
        )
    total = store._trusted_query(
        "SELECT count(*) FROM edge_scores WHERE score_id = ?", [score_id]
    ).item()
    plt, fig, ax = _figure(size)
    if not curve.is_empty():
        ax.plot(curve["n_edges"], curve["faithfulness"], marker="o", ms=3, label="top-n edges")
    if not circuits.is_empty():
        ax.scatter(circuits["n_edges"], circuits["faithfulness"], color="C3", zorder=3,
                   label="stored circuits")  # fmt: skip
    ax.axhline(1.0, color="0.5", lw=0.8, ls="--", label="full model (1.0)")
    ax.axhline(0.85, color="0.7", lw=0.8, ls=":", label="0.85")
    # symlog: linear up to 1 edge so that the empty circuit (0 edges) has its place, log beyond
    ax.set_xscale("symlog", linthresh=1)
    ax.set_xlim(0, max(total, 1))
    ax.set_xlabel(f"edges in circuit (of {total} scored)")
    ax.set_ylabel("faithfulness  (m(C) − m(corr)) / (m(model) − m(corr))")
    ax.set_title(f"{prov['task']}: faithfulness of top-scoring edge circuits")
    ax.legend(loc="lower right")
    ax.grid(alpha=0.3)
    _save(plt, fig, lookups.caption(prov), out)
    return pl.concat(
        [curve.with_columns(pl.lit("curve").alias("source")),
         circuits.drop("circuit_id").with_columns(pl.lit("circuit").alias("source"))],
        how="vertical_relaxed",
    )  # fmt: skip


def _check_faithfulness_id(store: Store, prov: dict[str, Any]) -> None:
    """A faithfulness curve belongs to an edge-level score set: for any other id, name the
    command that works for it."""
    query_id, kind = prov["query_id"], prov["kind"]
    if kind == "circuit":
        scores = prov["score_id"]
        raise UsageError(
            f"query {query_id} is a circuit; its curve is its score set's: actstore plot "
            f"{store.path} faithfulness {scores} -o faithfulness.png"
        )
    if kind != "attribute" or prov["level"] == "node":
        what = "a node-level score set" if kind == "attribute" else f"a {kind!r} query"
        raise UsageError(
            f"query {query_id} is {what}; faithfulness curves belong to edge score sets: "
            f"{_edge_curve_hint(store, prov['run_id'])}"
        )


def _edge_curve_hint(store: Store, run_id: int) -> str:
    """The next command toward a faithfulness curve of the run: plot one it has, make one
    from its newest edge score set, or score its edges."""
    sets = store._trusted_query(
        """
        SELECT q.query_id, EXISTS (SELECT 1 FROM faithfulness_curve c
                                   WHERE c.score_id = q.query_id) AS has_curve
        FROM queries q
        WHERE q.kind = 'attribute' AND q.run_id = ?
          AND q.query_id IN (SELECT score_id FROM edge_scores WHERE dst IS NOT NULL)
        ORDER BY has_curve DESC, q.query_id DESC LIMIT 1
        """,
        [run_id],
    ).rows()
    if not sets:
        return f"actstore attribute {store.path} --run {run_id} --method eap-ig"
    score_id, has_curve = sets[0]
    if has_curve:
        return f"actstore plot {store.path} faithfulness {score_id} -o faithfulness.png"
    return f"actstore circuit {store.path} --scores {score_id} --faithfulness 0.85"


def plot(
    store: Store,
    kind: str,
    ident: str,
    out: str | Path,
    by: str = "head",
    top_k: int | None = None,
    top_frac: float | None = None,
    circuits: bool = False,
    queries: list[int] | None = None,
    **filters: Any,
) -> pl.DataFrame:
    """The `actstore plot` dispatcher: ID is a patch query id (effects), a comma-separated run
    list (overlap; sets chosen as in `actstore overlap`) or a score id (faithfulness)."""
    refuse_inside_store(out, "-o")
    if kind == "overlap":
        runs = ov.parse_ids(ident, "ID")
        selection = ov.choose(by, top_k, top_frac, circuits)
        return plot_overlap(store, runs, selection, out, queries=queries, **filters)
    if kind not in PLOTS:
        raise UsageError(f"unknown plot {kind!r}; choose one of {', '.join(PLOTS)}")
    if queries is not None:
        raise UsageError(f"--queries applies to plot overlap, not plot {kind}; leave it out")
    ids = ov.parse_ids(ident, "ID")
    if len(ids) != 1:
        what = "a patch query id" if kind == "effects" else "a score id"
        raise UsageError(f"plot {kind} takes one ID ({what}), got {ident!r}")
    query_id = ids[0]
    if kind == "effects":
        return plot_effects(store, query_id, out)
    return plot_faithfulness(store, query_id, out)
