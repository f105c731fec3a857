"""What the report shows, read from the catalog in SQL: runs, patching effects, overlaps,
faithfulness curves, circuits and subspace reports, restricted to the chosen runs.

Nothing here renders; every function returns polars frames (or small records of them) that
`charts` and `page` turn into HTML. Nothing here loads a model or imports torch.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import Any

import polars as pl

from actstore.core.errors import UsageError
from actstore.core.names import EDGE_NAME, NODE_HEAD, NODE_KIND, NODE_LAYER
from actstore.core.store import Store
from queries.analysis import overlap as ov


def chosen_runs(store: Store, runs: list[int] | None) -> list[int]:
    """The runs the report covers (all by default); an unknown id is a usage error."""
    known = store._trusted_query("SELECT run_id FROM runs ORDER BY run_id")["run_id"].to_list()
    if runs is None:
        return known
    missing = [r for r in runs if r not in known]
    if missing:
        raise UsageError(
            f"--runs: run {missing[0]} is not in {store.path} (runs: {known or 'none'}); "
            "see actstore info"
        )
    if len(set(runs)) != len(runs):
        raise UsageError(f"--runs {','.join(map(str, runs))}: each run may appear once")
    return sorted(runs)


def runs_table(store: Store, runs: list[int]) -> pl.DataFrame:
    """Each run's provenance: what was ingested, how, its prompts' token lengths (`tokens`:
    "15–19" when they differ) and the bytes it holds (`info`)."""
    extra = store._trusted_query(
        """
        SELECT r.run_id, r.seed, r.dataset, r.seq_len,
               CASE WHEN p.shortest < p.longest THEN p.shortest || '–' || p.longest
                    ELSE coalesce(p.longest, r.seq_len)::VARCHAR END AS tokens,
               strftime(r.created_at, '%Y-%m-%d %H:%M:%S') AS created_at
        FROM runs r LEFT JOIN (
            SELECT run_id, min(seq_len) AS shortest, max(seq_len) AS longest
            FROM prompts GROUP BY run_id
        ) p USING (run_id)
        WHERE r.run_id IN (SELECT unnest(?))
        """,
        [runs],
    )
    return store.info().filter(pl.col("run_id").is_in(runs)).join(extra, on="run_id", how="left")


def params_text(params: str | None) -> str:
    """A query's stored parameters as one line, every key shown: `key=value; …`."""
    decoded: dict[str, Any] = json.loads(params) if params else {}
    return "; ".join(
        f"{key}={value if isinstance(value, str) else json.dumps(value)}"
        for key, value in sorted(decoded.items())
    )


def patch_queries(store: Store, runs: list[int]) -> pl.DataFrame:
    """One row per patching query of the runs, with its provenance and parameters."""
    df = store._trusted_query(
        """
        SELECT q.query_id, q.run_id, r.model, r.task, r.corruption, r.n_prompts,
               qp.component, qp.metric, qp.direction, qp.window_size, qp.roles,
               q.params, q.created_at, q.wall_s,
               (SELECT count(*) FROM effects e WHERE e.query_id = q.query_id) AS n_effects
        FROM current_queries q JOIN query_params qp USING (query_id)
             LEFT JOIN runs r ON r.run_id = q.run_id
        WHERE q.kind = 'patch' AND q.run_id IN (SELECT unnest(?))
        ORDER BY q.query_id
        """,
        [runs],
    )
    return df.with_columns(
        pl.col("params").map_elements(params_text, return_dtype=pl.String).alias("params_text")
    )


def patch_effects(store: Store, query_ids: list[int]) -> dict[int, pl.DataFrame]:
    """Every effect row of the patching queries, with its importance, by query id."""
    df = store._trusted_query(
        """
        SELECT p.*
        FROM patch_effects p JOIN queries q USING (query_id)
        WHERE q.kind = 'patch' AND p.query_id IN (SELECT unnest(?))
        ORDER BY p.query_id, p.layer, p.head NULLS FIRST, p.pos NULLS FIRST
        """,
        [query_ids],
    )
    if "role" not in df.columns:  # a catalog from before roles, read as it is
        df = df.with_columns(pl.lit(None, dtype=pl.String).alias("role"))
    df = df.select(
        "query_id",
        "layer",
        "head",
        "pos",
        "role",
        "node",
        "metric",
        "value",
        "normalized",
        "importance",
    ).with_columns(pl.col("value", "normalized", "importance").fill_nan(None))
    return {key[0]: part for key, part in df.partition_by("query_id", as_dict=True).items()}


@dataclass
class OverlapGroup:
    """The sets of one setting (`queries.analysis.overlap`'s like-with-like rule), one per run,
    and their pairwise statistics with the shared items; `note` says why they could not be
    compared."""

    selection: ov.Selection
    title: str
    pairs: pl.DataFrame = field(default_factory=pl.DataFrame)
    note: str | None = None

    @property
    def by(self) -> str:
        return self.selection.by


def overlap_groups(
    store: Store, runs: list[int], heads: ov.Selection, edges: ov.Selection
) -> list[OverlapGroup]:
    """Per setting of head patching queries and of edge score sets among the runs, each run's
    newest source; groups of two or more runs are compared, the others say why not."""
    groups = []
    for selection in (heads, edges):
        kind = ov.source_kind(selection)
        newest: dict[str, dict[int, int]] = {}
        for row in sorted(ov.candidates(store, kind, ov.Filters()), key=lambda r: r["source_id"]):
            if row["run_id"] in runs:
                setting = ov.setting_of(kind, row)
                newest.setdefault(setting, {})[row["run_id"]] = row["source_id"]
        for setting, per_run in newest.items():
            group = OverlapGroup(selection, f"{setting}; {selection.describe()}")
            if len(per_run) < 2:
                (run,) = per_run
                group.note = f"only run {run} has such a set: nothing to compare it with"
            else:
                sources = [per_run[run] for run in sorted(per_run)]
                try:
                    pairs = ov.overlap(store, None, selection, queries=sources)
                except UsageError as exc:
                    group.note = str(exc)
                else:
                    group.pairs = ov.with_shared(store, pairs, selection)
            groups.append(group)
    return groups


def faithfulness_curves(store: Store, runs: list[int]) -> dict[int, pl.DataFrame]:
    """Per score set, every evaluated circuit size (n_edges after pruning, top_n before) and
    its faithfulness, from all of the set's circuit queries."""
    df = store._trusted_query(
        """
        SELECT DISTINCT f.score_id, f.top_n, f.n_edges, f.faithfulness
        FROM faithfulness_curve f JOIN current_queries a ON a.query_id = f.score_id
        WHERE a.run_id IN (SELECT unnest(?))
        ORDER BY f.score_id, f.top_n, f.n_edges
        """,
        [runs],
    ).with_columns(pl.col("faithfulness").fill_nan(None))
    return {key[0]: part for key, part in df.partition_by("score_id", as_dict=True).items()}


def circuits(store: Store, runs: list[int]) -> pl.DataFrame:
    """Every stored circuit of the runs with its score set's provenance."""
    return store._trusted_query(
        """
        SELECT c.circuit_id, c.score_id, c.run_id, c.model, c.task, c.corruption, c.method,
               c.n_edges_stored AS n_edges, c.n_heads, c.faithfulness, k.top_n, k.metric,
               k.clean_metric, k.corrupted_metric,
               c.params, m.n_layers, m.n_heads AS heads_per_layer,
               (SELECT count(*) FROM edge_scores s WHERE s.score_id = c.score_id) AS n_scored
        FROM circuits_v c JOIN circuits k USING (circuit_id)
             LEFT JOIN models m ON m.model = c.model
        WHERE c.run_id IN (SELECT unnest(?))
        ORDER BY c.circuit_id
        """,
        [runs],
    ).with_columns(
        pl.col("params").map_elements(params_text, return_dtype=pl.String).alias("params_text")
    )


# A node name of the edge graph as (kind, layer, head): input, a{l}.h{h}, m{l}, logits.
NODE_PARTS = ", ".join(
    f"{form} AS {name}"
    for form, name in ((NODE_KIND, "kind"), (NODE_LAYER, "layer"), (NODE_HEAD, "head"))
)


def circuit_graph(store: Store, circuit_id: int) -> tuple[pl.DataFrame, pl.DataFrame]:
    """A circuit's nodes (kind, layer, head) and edges (src, dst, qkv, name, score); an edge's
    score is the one its score set gave it."""
    edges = store._trusted_query(
        f"""
        SELECT ce.src, ce.dst, ce.qkv,
               {EDGE_NAME.format(src="ce.src", dst="ce.dst", qkv="ce.qkv")} AS edge,
               coalesce(ce.score, s.score) AS score
        FROM circuit_edges ce JOIN circuits c USING (circuit_id)
             LEFT JOIN edge_scores s ON s.score_id = c.score_id AND s.src = ce.src
                  AND s.dst = ce.dst AND s.qkv IS NOT DISTINCT FROM ce.qkv
        WHERE ce.circuit_id = ?
        ORDER BY abs(coalesce(ce.score, s.score)) DESC NULLS LAST, ce.src, ce.dst, ce.qkv
        """,
        [circuit_id],
    ).with_columns(pl.col("score").fill_nan(None))
    nodes = store._trusted_query(
        f"""
        SELECT node, {NODE_PARTS.format(node="node")}
        FROM (SELECT src AS node FROM circuit_edges WHERE circuit_id = ?
              UNION SELECT dst FROM circuit_edges WHERE circuit_id = ?)
        ORDER BY node
        """,
        [circuit_id, circuit_id],
    )
    return nodes, edges


def subspace_reports(store: Store, runs: list[int]) -> pl.DataFrame:
    """Every subspace query's report rows (v, row, null, full) with its source parameters."""
    return store._trusted_query(
        """
        SELECT s.*, r.task, r.model, q.params, qp.basis AS source, qp.reader
        FROM subspace_reports s JOIN current_queries q USING (query_id)
             JOIN query_params qp USING (query_id) LEFT JOIN runs r ON r.run_id = s.run_id
        WHERE s.run_id IN (SELECT unnest(?))
        ORDER BY s.query_id, list_position(['v', 'row', 'null', 'full'], s.component)
        """,
        [runs],
    ).with_columns(pl.col("variance", "value", "normalized", "effect").fill_nan(None))
