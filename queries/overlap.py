"""Overlap between runs' head sets or edge sets: intersection, IoU, directional overlap and a
hypergeometric p-value, over every ordered pair of sets (a long table that pivots to a matrix).

Sets are chosen and intersected in DuckDB over the `top_heads`, `top_edges`, `circuit_heads`
and `circuit_edges_v` views (Merullo et al. compare in-circuit heads across tasks; Hanna et al.
compare edge sets by IoU with a hypergeometric test). Only the p-value is computed outside SQL,
by scipy on the counts SQL returns.

The p-value is P(X ≥ |A∩B|) for X ~ Hypergeometric(N, |A|, |B|): the chance that a random set of
|B| items out of all N heads (n_layers·n_heads) or all N scored edges shares at least as many
items with A.
"""

from __future__ import annotations

from dataclasses import dataclass

import polars as pl

from actstore.errors import UsageError
from actstore.store import Store
from queries import views

BY = ("head", "edge")
DEFAULT_TOP_FRAC = 0.02  # Merullo et al.'s in-circuit heads: the top 2% by effect


def parse_ids(text: str, option: str = "--runs") -> list[int]:
    """'1,2,3' as [1, 2, 3]; a usage error naming the option otherwise."""
    try:
        ids = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise UsageError(f"{option} {text!r}: give comma-separated integer ids, e.g. 1,2") from None
    if not ids:
        raise UsageError(f"{option}: give comma-separated integer ids, e.g. 1,2")
    return ids


@dataclass(frozen=True)
class Selection:
    """How each run's set is chosen: top-k, top-fraction, or its latest circuit."""

    by: str = "head"
    top_k: int | None = None
    top_frac: float | None = None
    circuits: bool = False

    def __post_init__(self) -> None:
        if self.by not in BY:
            raise UsageError(f"--by {self.by!r}: choose head or edge")
        given = sum([self.top_k is not None, self.top_frac is not None, self.circuits])
        if given != 1:
            raise UsageError("choose the sets one way: --top-k K, --top-frac F or --circuits")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"--top-k {self.top_k}: give a positive number of items")
        if self.top_frac is not None and not 0 < self.top_frac <= 1:
            raise UsageError(f"--top-frac {self.top_frac}: give a fraction in (0, 1], e.g. 0.02")

    def describe(self) -> str:
        items = "heads" if self.by == "head" else "edges"
        if self.circuits:
            return f"circuit {items}"
        if self.top_k is not None:
            return f"top {self.top_k} {items}"
        return f"top {100 * self.top_frac:.4g}% of {items}"

    def members_sql(self) -> tuple[str, list]:
        """SQL yielding (source_id, item) for every source; parameters in order."""
        if self.circuits:
            if self.by == "head":
                return "SELECT circuit_id AS source_id, node AS item FROM circuit_heads", []
            return "SELECT DISTINCT circuit_id AS source_id, edge AS item FROM circuit_edges_v", []
        view, key, item = (
            ("top_heads", "query_id", "node")
            if self.by == "head"
            else ("top_edges", "score_id", "edge")
        )
        cut, value = ("rank <= ?", self.top_k) if self.top_k is not None else (
            "frac_rank < ?", self.top_frac)  # fmt: skip
        return f"SELECT {key} AS source_id, {item} AS item FROM {view} WHERE {cut}", [value]

    def universe_sql(self) -> str:
        """SQL yielding (source_id, universe): all heads of the model, or all scored edges."""
        if self.by == "head":
            source = "circuit_id" if self.circuits else "query_id"
            table = "circuits_v" if self.circuits else "queries"
            return f"""
                SELECT s.{source} AS source_id, (m.n_layers * m.n_heads)::BIGINT AS universe
                FROM {table} s JOIN runs r ON r.run_id = s.run_id JOIN models m ON m.model = r.model
                """
        scored = "SELECT score_id, count(*) AS universe FROM edge_scores GROUP BY score_id"
        if self.circuits:
            return f"""
                SELECT c.circuit_id AS source_id, e.universe FROM circuits c
                JOIN ({scored}) e USING (score_id)
                """
        return f"SELECT score_id AS source_id, universe FROM ({scored})"


def choose(
    by: str = "head",
    top_k: int | None = None,
    top_frac: float | None = None,
    circuits: bool = False,
) -> Selection:
    """A Selection from CLI-style options; neither top-k, top-frac nor circuits: top 2%."""
    if top_k is None and top_frac is None and not circuits:
        top_frac = DEFAULT_TOP_FRAC
    return Selection(by=by, top_k=top_k, top_frac=top_frac, circuits=circuits)


@dataclass(frozen=True)
class Filters:
    """Which of a run's queries its set comes from: the newest one that matches."""

    metric: str | None = None
    component: str = "head"
    direction: str | None = None
    method: str | None = None


def resolve_sources(
    store: Store, runs: list[int], selection: Selection, filters: Filters
) -> list[int]:
    """Per run, the id its set comes from: patch query, score set or circuit (newest match)."""
    if len(set(runs)) != len(runs):
        raise UsageError(f"--runs {','.join(map(str, runs))}: each run may appear once")
    if selection.circuits:
        return [views.latest_circuit(store, r, filters.method) for r in runs]
    if selection.by == "edge":
        return [views.latest_score_set(store, r, filters.method) for r in runs]
    return [
        views.latest_patch_query(store, r, filters.component, filters.metric, filters.direction)
        for r in runs
    ]


def overlap(
    store: Store, runs: list[int], selection: Selection, **filters: str | None
) -> pl.DataFrame:
    """Overlap statistics over every ordered pair of the runs' sets (diagonal included);
    `filters` are the fields of Filters (metric, component, direction, method)."""
    if len(runs) < 2:
        raise UsageError("give at least two runs to compare, e.g. --runs 1,2")
    sources = resolve_sources(store, runs, selection, Filters(**filters))
    return overlap_of_sources(store, list(zip(runs, sources, strict=True)), selection)


# Pair statistics over two relations: `sets(set_idx, run_id, source_id, task, universe)` and
# `members(set_idx, item)`; one row per ordered pair of sets, the diagonal included.
PAIRS_SQL = """
    sizes AS (
        SELECT s.set_idx, s.run_id, s.source_id, s.task, s.universe, count(m.item) AS size
        FROM sets s LEFT JOIN members m USING (set_idx)
        GROUP BY ALL
    ),
    shared AS (
        SELECT a.set_idx AS idx_a, b.set_idx AS idx_b, count(*) AS intersection
        FROM members a JOIN members b USING (item)
        GROUP BY ALL
    ),
    counts AS (
        SELECT a.set_idx AS idx_a, b.set_idx AS idx_b,
               a.run_id AS run_a, b.run_id AS run_b, a.task AS task_a, b.task AS task_b,
               a.source_id AS source_a, b.source_id AS source_b, a.size AS n_a, b.size AS n_b,
               coalesce(sh.intersection, 0) AS intersection, a.universe AS universe_a,
               b.universe AS universe_b
        FROM sizes a CROSS JOIN sizes b
             LEFT JOIN shared sh ON sh.idx_a = a.set_idx AND sh.idx_b = b.set_idx
    )
    SELECT run_a, run_b, task_a, task_b, source_a, source_b, n_a, n_b, intersection,
           n_a + n_b - intersection AS union_size,
           intersection / nullif(n_a + n_b - intersection, 0) AS iou,
           intersection / nullif(n_a, 0) AS frac_of_a,
           intersection / nullif(n_b, 0) AS frac_of_b,
           universe_a, universe_b
    FROM counts ORDER BY idx_a, idx_b
"""


def overlap_of_sources(
    store: Store, sets: list[tuple[int, int]], selection: Selection
) -> pl.DataFrame:
    """Overlap of explicit (run_id, source_id) sets; the source id is a patch query id (heads),
    a score id (edges) or a circuit id (--circuits)."""
    members, member_params = selection.members_sql()
    values = ", ".join("(?, ?, ?)" for _ in sets)
    set_params = [v for i, (run, source) in enumerate(sets) for v in (i, run, source)]
    df = store.query(
        f"""
        WITH given AS (SELECT * FROM (VALUES {values}) s(set_idx, run_id, source_id)),
        sets AS (
            SELECT g.set_idx, g.run_id, g.source_id, r.task, u.universe
            FROM given g LEFT JOIN runs r USING (run_id)
                 LEFT JOIN ({selection.universe_sql()}) u USING (source_id)
        ),
        members AS (
            SELECT s.set_idx, m.item FROM sets s JOIN ({members}) m USING (source_id)
        ),
        {PAIRS_SQL}
        """,
        [*set_params, *member_params],
    )
    _check_universe(df, selection)
    return with_p_values(df.drop("universe_b").rename({"universe_a": "universe"}))


def _check_universe(df: pl.DataFrame, selection: Selection) -> None:
    by_run = dict(zip(df["run_a"], df["universe_a"], strict=False))
    missing = [r for r, u in by_run.items() if u is None]
    if missing:
        raise UsageError(
            f"run {missing[0]}: its model's shape is not in the catalog; re-ingest the run"
        )
    if len(set(by_run.values())) > 1:
        items = "heads" if selection.by == "head" else "scored edges"
        sizes = ", ".join(f"run {r}: {u}" for r, u in by_run.items())
        raise UsageError(
            f"the runs have different numbers of {items} ({sizes}); overlap compares sets "
            "drawn from one model's graph: choose runs of one model"
        )


def with_p_values(df: pl.DataFrame) -> pl.DataFrame:
    """Add the expected intersection under independence and the hypergeometric P(X ≥ k)."""
    from scipy.stats import hypergeom

    k = df["intersection"].to_numpy()
    n = df["universe"].to_numpy()
    a = df["n_a"].to_numpy()
    b = df["n_b"].to_numpy()
    p = hypergeom.sf(k - 1, n, a, b)
    return df.with_columns(
        pl.Series("expected", a * b / n, dtype=pl.Float64),
        pl.Series("p_value", p.clip(0.0, 1.0), dtype=pl.Float64),
    )


def matrix(df: pl.DataFrame, value: str = "iou") -> tuple[list[str], list[list[float | None]]]:
    """The long table pivoted: labels ("run 1 ioi") and a square matrix of one statistic."""
    labels = []
    for run, task in zip(df["run_a"], df["task_a"], strict=True):
        label = f"run {run} {task}"
        if label not in labels:
            labels.append(label)
    size = len(labels)
    values = df[value].to_list()
    return labels, [values[i * size : (i + 1) * size] for i in range(size)]
