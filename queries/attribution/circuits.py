"""Circuits from edge scores, and their exact faithfulness.

A circuit is the top-N edges of a score set by |score| (ties: the graph's fixed edge order),
optionally pruned of edges into nodes that have no circuit path to the logits. Pruning never
changes the faithfulness: such a node's output reaches the logits only through edges outside
the circuit, which carry corrupted values, so its inputs do not matter.

Faithfulness is exact, one forward per circuit and prompt batch (`EdgeModel.run` with the edges
outside the circuit carrying the corrupted run's source outputs read from the store):

    faithfulness(C) = (m(C) − m(corrupted)) / (m(model) − m(corrupted))

with m(model), m(corrupted) from the run's stored final logits and the score set's metric.
`--faithfulness F` searches the smallest N: N = 0, 1, 2, 4, … until a circuit reaches F, then
bisection between the last two (assuming faithfulness grows with N; every point is stored in
`faithfulness_curve`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime

import numpy as np
import polars as pl

from actstore.core.choices import METRICS, check
from actstore.core.errors import ActstoreError, UsageError
from actstore.core.names import LOGITS
from actstore.core.results import query_params
from actstore.core.runtime import Runtime
from actstore.core.store import Store
from actstore.model.architecture import Architecture
from queries.attribution.graph import Graph
from queries.core.recorded import recorded
from queries.core.sweep import check_cluster, cluster


def score_graph(store: Store, score_id: int) -> tuple[dict, Graph, np.ndarray]:
    """A recorded edge-level score set: its query row, graph and (n_forward, n_backward) scores."""
    query = query_params(store, score_id)
    if query["kind"] != "attribute":
        raise UsageError(f"query {score_id} is a {query['kind']} query, not an attribute score set")
    if query["params"]["level"] != "edge":
        raise UsageError(
            f"score set {score_id} is node level; circuits need edge scores "
            "(actstore attribute --level edge)"
        )
    with store.reading():
        run = store.run(query["run_id"])
        shape = store._trusted_query(
            "SELECT n_layers, n_heads, architecture FROM models WHERE model = ?", [run["model"]]
        )
        rows = store._trusted_query(
            "SELECT src, dst, qkv, score FROM edge_scores WHERE score_id = ?", [score_id]
        )
    arch = shape["architecture"][0]
    graph = (Graph.of(Architecture.from_json(arch)) if arch is not None
             else Graph(int(shape["n_layers"][0]), int(shape["n_heads"][0])))  # fmt: skip
    scores = np.zeros((graph.n_forward, graph.n_backward))
    for src, dst, qkv, score in rows.iter_rows():
        scores[graph.cell_of(src, dst, qkv)] = score
    return query, graph, scores


def top_edges(graph: Graph, scores: np.ndarray, n: int, prune: bool) -> np.ndarray:
    """Mask of the n edges of largest |score|, pruned of edges with no path to the logits."""
    rows, cols = graph.edge_cells
    order = np.argsort(-np.abs(scores[rows, cols]), kind="stable")[:n]
    mask = np.zeros((graph.n_forward, graph.n_backward), dtype=bool)
    mask[rows[order], cols[order]] = True
    return prune_dead(graph, mask) if prune else mask


def prune_dead(graph: Graph, mask: np.ndarray) -> np.ndarray:
    """Drop edges into nodes from which no circuit path leads to the logits."""
    dst_node = np.asarray(
        [graph.forward_names.index(d) if d != LOGITS else -1 for d, _ in graph.backward_names]
    )
    alive = np.zeros(graph.n_forward, dtype=bool)
    for s in range(graph.n_forward - 1, -1, -1):  # forward order is topological
        targets = np.nonzero(mask[s])[0]
        alive[s] = any(dst_node[j] < 0 or alive[dst_node[j]] for j in targets)
    live_dst = np.asarray([j < 0 or alive[j] for j in dst_node])
    return mask & live_dst[None, :]


ALL = "all"  # as an edge count: every edge of the graph


def parse_sizes(text: str) -> int | str | list[int | str]:
    """`--edges` as typed: 'N' is one circuit, 'N1,N2,…' a curve, 'all' every edge (checked by
    `check_sizes`)."""
    parts = [part.strip() for part in text.split(",")]
    try:
        sizes = [part if part == ALL else int(part) for part in parts]
    except ValueError:
        raise UsageError(
            f"--edges {text!r}: give an edge count, 'all' or comma-separated counts, e.g. "
            "0,10,50,all"
        ) from None
    return sizes[0] if len(sizes) == 1 else sizes


def check_sizes(edges: int | str | Sequence[int | str]) -> int | str | list[int | str]:
    """One size, or a list of distinct sizes (sorted, 'all' last): a curve measured in one
    pass."""
    sizes = [edges] if isinstance(edges, int | str) else list(edges)
    if not sizes or not all(
        n == ALL or (isinstance(n, int) and not isinstance(n, bool)) for n in sizes
    ):
        raise UsageError(
            f"--edges {edges!r}: give an edge count, 'all' or a list of them, e.g. 0,10,50,all"
        )
    counts = [n for n in sizes if n != ALL]
    if any(n < 0 for n in counts):
        raise UsageError(f"--edges {min(counts)}: need 0 or more")
    repeated = sorted({str(n) for n in sizes if sizes.count(n) > 1})
    if repeated:
        raise UsageError(f"--edges: {repeated[0]} is listed twice; give each size once")
    ordered = sorted(counts) + [ALL] * (ALL in sizes)
    return ordered[0] if len(ordered) == 1 else ordered


def resolve_sizes(edges: int | str | list[int | str], n_edges: int) -> int | list[int]:
    """The checked sizes with 'all' as the graph's edge count, refused past it or repeated."""
    sizes = [
        n_edges if n == ALL else n for n in ([edges] if isinstance(edges, int | str) else edges)
    ]
    if sizes[-1] > n_edges:
        raise UsageError(f"--edges {sizes[-1]}: the graph has {n_edges} edges")
    if len(set(sizes)) < len(sizes):
        raise UsageError(f"--edges: {n_edges} and all are the same size; give it once")
    return sizes[0] if len(sizes) == 1 else sizes


def circuit(
    store: Store,
    scores: int,
    edges: int | str | Sequence[int | str] | None = None,
    faithfulness: float | None = None,
    prune: bool = True,
    metric: str | None = None,
    recompute: bool = False,
    runtime: Runtime = Runtime(),
) -> pl.DataFrame:
    """Build and evaluate a circuit from score set `scores`; returns its `circuits` row.

    `edges` is a count or "all" (every edge), or a list of them: every size is measured in one
    pass over the run (one model, each prompt batch read once), all of them land in
    `faithfulness_curve`, the largest is the recorded circuit, and the frame has one row per
    size. Faithfulness is measured in the score
    set's metric, or in `metric` (e.g. accuracy, which attribution cannot score by, being
    without gradients).

    With the runtime's `workers` or `scheduler` every faithfulness measurement runs its prompt
    batches as Dask tasks (queries/core/sweep.py); the circuit is recorded the same, whatever
    the cluster.
    """
    if (edges is None) == (faithfulness is None):
        raise UsageError("give --edges N or --faithfulness F (exactly one)")
    if edges is not None:
        edges = check_sizes(edges)
    if faithfulness is not None and not 0 < faithfulness <= 1:
        raise UsageError(
            f"--faithfulness {faithfulness}: give a fraction of the model's metric above 0 and at "
            "most 1 (e.g. 0.85)"
        )
    query, graph, values = score_graph(store, scores)
    if edges is not None:  # "all" is the edge count: `--edges all` asks what `--edges N` does
        edges = resolve_sizes(edges, graph.n_edges)
    sizes = [] if edges is None else [edges] if isinstance(edges, int) else edges
    params = {"scores": scores, "edges": edges, "faithfulness": faithfulness, "prune": prune}
    if metric is not None:
        check("--metric", metric, METRICS)
        if metric != query["params"]["metric"]:  # the scores' own metric keeps the old identity
            params["metric"] = metric
    metric = metric or query["params"]["metric"]
    run = query["run_id"]
    check_cluster(runtime)

    def compute() -> dict[str, pl.DataFrame]:
        from queries.attribution.evaluate import Evaluator

        with cluster(runtime) as client:
            ev = Evaluator(store, store.run(run), metric, runtime, client, keep=not sizes)
            curve: dict[int, tuple[np.ndarray, float]] = {}

            def measure(ns: list[int]) -> None:
                todo = [n for n in dict.fromkeys(ns) if n not in curve]
                masks = [top_edges(graph, values, n, prune) for n in todo]
                for n, mask, value in zip(todo, masks, ev.metric_of(masks), strict=True):
                    curve[n] = (mask, value)

            if sizes:
                measure(sizes)
                chosen = sizes[-1]
            else:
                chosen = _search(graph.n_edges, faithfulness, measure, curve, ev)
        return _result_frames(graph, values, scores, metric, params, curve, chosen, ev)

    def read(circuit_id: int) -> pl.DataFrame:
        if isinstance(edges, list):
            return stored_sizes(store, circuit_id)
        return stored_circuit(store, circuit_id)

    return recorded(store, "circuit", run, params, compute, read, recompute)


def _search(n_edges: int, target: float, measure, curve: dict, ev) -> int:
    """Smallest N whose circuit reaches `target` (doubling, then bisection)."""

    def reaches(n: int) -> bool:
        return ev.faithfulness(curve[n][1]) >= target

    grid = [0]
    while grid[-1] < n_edges:
        grid.append(min(n_edges, max(1, grid[-1] * 2)))
    measure(grid)
    hits = [n for n in grid if reaches(n)]
    if not hits:
        best = max(ev.faithfulness(curve[n][1]) for n in grid)
        raise ActstoreError(
            f"no circuit reaches faithfulness {target} (best {best:.4f}); choose a lower target"
        )
    hi = hits[0]
    lo = grid[grid.index(hi) - 1] if hi > 0 else -1
    while hi - lo > 1:
        mid = (lo + hi) // 2
        measure([mid])
        lo, hi = (lo, mid) if reaches(mid) else (mid, hi)
    return hi


def _result_frames(
    graph: Graph,
    values: np.ndarray,
    score_id: int,
    metric: str,
    params: dict,
    curve: dict[int, tuple[np.ndarray, float]],
    chosen: int,
    ev,
) -> dict[str, pl.DataFrame]:
    mask, value = curve[chosen]
    edges = graph.edge_frame(values).filter(pl.Series(mask[graph.edge_cells]))
    edges = edges.sort(pl.col("score").abs(), descending=True)
    circuits = pl.DataFrame(
        {
            "score_id": [score_id],
            "n_edges": [int(mask.sum())],
            "faithfulness": [ev.faithfulness(value)],
            "params": [json.dumps(params, sort_keys=True)],
            "created_at": [datetime.now()],
            "top_n": [chosen],
            "metric": [metric],
            "metric_value": [value],
            "clean_metric": [ev.clean_metric],
            "corrupted_metric": [ev.corrupted_metric],
        }
    )
    points = sorted(curve.items())
    curve_frame = pl.DataFrame(
        {
            "score_id": [score_id] * len(points),
            "n_edges": [int(m.sum()) for _, (m, _) in points],
            "faithfulness": [ev.faithfulness(v) for _, (_, v) in points],
            "top_n": [n for n, _ in points],
            "metric_value": [v for _, (_, v) in points],
        }
    )
    return {"circuits": circuits, "circuit_edges": edges, "faithfulness_curve": curve_frame}


def stored_circuit(store: Store, circuit_id: int) -> pl.DataFrame:
    return store._trusted_query(
        "SELECT circuit_id, score_id, top_n, n_edges, faithfulness, metric, metric_value, "
        "clean_metric, corrupted_metric FROM circuits WHERE circuit_id = ?",
        [circuit_id],
    )


def stored_sizes(store: Store, circuit_id: int) -> pl.DataFrame:
    """A curve query's rows: the circuit's columns for every size on its curve."""
    return store._trusted_query(
        "SELECT c.circuit_id, c.score_id, f.top_n, f.n_edges, f.faithfulness, c.metric, "
        "f.metric_value, c.clean_metric, c.corrupted_metric FROM faithfulness_curve f "
        "JOIN circuits c USING (circuit_id) WHERE circuit_id = ? ORDER BY f.top_n",
        [circuit_id],
    )


def stored_curve(store: Store, circuit_id: int) -> pl.DataFrame:
    return store._trusted_query(
        "SELECT top_n, n_edges, faithfulness, metric_value FROM faithfulness_curve "
        "WHERE circuit_id = ? ORDER BY top_n",
        [circuit_id],
    )
