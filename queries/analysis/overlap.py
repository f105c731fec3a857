"""Overlap between runs' head sets or edge sets: intersection, IoU, directional overlap and a
hypergeometric p-value, over every ordered pair of sets (a long table that pivots to a matrix).

Sets are compared like with like: every set of one comparison comes from a source (patch query,
score set or circuit) of the same setting — component, metric, direction and window for head
sets from patching; method, metric and steps for score sets (and the selection rule for
circuits) — over runs of the same corruption. Explicit source ids are checked for that; without
them each run's newest source of the one setting that all runs have is used, and anything
ambiguous or mismatched is refused with a line naming it. The rows carry the source ids and the
setting.

Sets are chosen and intersected in DuckDB over the `top_heads`, `top_edges`, `circuit_heads`
and `circuit_edges_v` views (Merullo et al. compare in-circuit heads across tasks; Hanna et al.
compare edge sets by IoU with a hypergeometric test). Only the p-value is computed outside SQL,
by scipy on the counts SQL returns.

The p-value is P(X ≥ |A∩B|) for X ~ Hypergeometric(N, |A|, |B|): the chance that a random set of
|B| items out of all N heads (n_layers·n_heads) or all N scored edges shares at least as many
items with A.
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import polars as pl

from actstore.core.choices import SETS
from actstore.core.errors import UsageError
from actstore.core.store import Store

DEFAULT_TOP_FRAC = 0.02  # Merullo et al.'s in-circuit heads: the top 2% by effect
# The default's smallest set: 2% of a small model's heads is one head, and the IoU of two
# one-item sets is 0 or 1 whatever the circuits share.
DEFAULT_FLOOR = {"head": 4, "edge": 20}
# Below this many items a set's overlap says little; every output that shows one warns.
FEW_ITEMS = 3


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
    """How each run's set is chosen: top-k, top-fraction (with at least `floor` items), or
    its latest circuit."""

    by: str = "head"
    top_k: int | None = None
    top_frac: float | None = None
    circuits: bool = False
    floor: int | None = None

    def __post_init__(self) -> None:
        if self.by not in SETS:
            raise UsageError(f"--by {self.by!r}: choose head or edge")
        given = sum([self.top_k is not None, self.top_frac is not None, self.circuits])
        if given != 1:
            raise UsageError("choose the sets one way: --top-k K, --top-frac F or --circuits")
        if self.top_k is not None and self.top_k < 1:
            raise UsageError(f"--top-k {self.top_k}: give a positive number of items")
        if self.top_frac is not None and not 0 < self.top_frac <= 1:
            raise UsageError(f"--top-frac {self.top_frac}: give a fraction in (0, 1], e.g. 0.02")
        if self.floor is not None and self.top_frac is None:
            raise UsageError("a floor on the set size applies to top-fraction sets only")

    @property
    def items(self) -> str:
        return "heads" if self.by == "head" else "edges"

    def describe(self) -> str:
        if self.circuits:
            return f"circuit {self.items}"
        if self.top_k is not None:
            return f"top {self.top_k} {self.items}"
        floor = f" (at least {self.floor})" if self.floor else ""
        return f"top {100 * self.top_frac:.4g}% of {self.items}{floor}"

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
        if self.top_k is not None:
            cut, values = "rank <= ?", [self.top_k]
        else:
            cut, values = "(frac_rank < ? OR rank <= ?)", [self.top_frac, self.floor or 0]
        return f"SELECT {key} AS source_id, {item} AS item FROM {view} WHERE {cut}", values

    def universe_sql(self) -> str:
        """SQL yielding (source_id, universe): the heads a patch query scored (a window of K
        layers scores n_layers - K + 1 starts), a circuit's model's heads, or all scored edges:
        a set is drawn from what could have been in it."""
        if self.by == "head" and not self.circuits:
            return """
                SELECT query_id AS source_id, any_value(n_heads)::BIGINT AS universe
                FROM top_heads GROUP BY query_id
                """
        if self.by == "head":
            return """
                SELECT s.circuit_id AS source_id, (m.n_layers * m.n_heads)::BIGINT AS universe
                FROM circuits_v s JOIN runs r ON r.run_id = s.run_id
                JOIN models m ON m.model = r.model
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
    """A Selection from CLI-style options; neither top-k, top-frac nor circuits: the top 2%,
    and at least DEFAULT_FLOOR items (4 heads, 20 edges), so that the default never compares
    sets too small to mean anything."""
    floor = None
    if top_k is None and top_frac is None and not circuits:
        top_frac, floor = DEFAULT_TOP_FRAC, DEFAULT_FLOOR.get(by)
    return Selection(by=by, top_k=top_k, top_frac=top_frac, circuits=circuits, floor=floor)


# What must be identical for two sets to be compared, per kind of source, besides the run's
# corruption: a head set's patching query, an edge set's score set, a circuit's score set and
# selection rule. Each SQL yields (source_id, run_id, corruption, *key columns).
SOURCE_KEYS: dict[str, tuple[str, ...]] = {
    "patch query": ("component", "metric", "direction", "window"),
    "score set": ("method", "metric", "steps"),
    "circuit": ("method", "metric", "steps", "edges", "faithfulness"),
}
PLURAL = {"patch query": "patch queries", "score set": "score sets", "circuit": "circuits"}
SOURCES_SQL = {
    "patch query": """
        SELECT DISTINCT t.query_id AS source_id, t.run_id, t.corruption, t.component, t.metric,
               t.direction, coalesce(t.window_size, 1) AS "window", q.layers
        FROM top_heads t JOIN query_params q USING (query_id)""",
    "score set": """
        SELECT q.query_id AS source_id, q.run_id, r.corruption, q.method, q.metric, q.steps
        FROM query_params q JOIN runs r USING (run_id)
        WHERE q.kind = 'attribute'
          AND q.query_id IN (SELECT score_id FROM edge_scores WHERE dst IS NOT NULL)""",
    "circuit": """
        SELECT c.circuit_id AS source_id, c.run_id, c.corruption, c.method, a.metric, a.steps,
               p.edges, p.faithfulness
        FROM circuits_v c JOIN query_params a ON a.query_id = c.score_id
             LEFT JOIN query_params p ON p.query_id = c.circuit_id""",
}


@dataclass(frozen=True)
class Filters:
    """Which of a run's queries its set may come from (None: any)."""

    component: str | None = None
    metric: str | None = None
    direction: str | None = None
    window: int | None = None
    method: str | None = None

    def given(self) -> dict[str, str | int]:
        return {k: v for k, v in vars(self).items() if v is not None}


def source_kind(selection: Selection) -> str:
    if selection.circuits:
        return "circuit"
    return "patch query" if selection.by == "head" else "score set"


def _check_filters(kind: str, filters: Filters) -> None:
    """A filter that cannot select this kind of source is an error, not ignored."""
    for name in filters.given():
        if name not in SOURCE_KEYS[kind]:
            patching = name in SOURCE_KEYS["patch query"]
            applies = "head sets from patching (--by head)" if patching else (
                "edge scores and circuits")  # fmt: skip
            raise UsageError(f"--{name} applies to {applies}, not to {PLURAL[kind]}; leave it out")


def candidates(store: Store, kind: str, filters: Filters) -> list[dict]:
    """Every source of this kind in the store matching the filters, newest first."""
    rows = store._trusted_query(
        f"SELECT * FROM ({SOURCES_SQL[kind]}) ORDER BY source_id DESC"
    ).to_dicts()
    given = filters.given()
    return [r for r in rows if all(r.get(k) == v for k, v in given.items()) and not partial(r)]


def partial(row: dict) -> bool:
    """A head sweep over some layers only (`layers=`): its top heads are not a head set of the
    model, so it is never compared with one."""
    return row.get("layers") is not None


def key_of(row: dict, kind: str) -> tuple:
    return tuple(row[k] for k in SOURCE_KEYS[kind])


def describe_key(kind: str, key: tuple) -> str:
    return ", ".join(f"{k} {'–' if v is None else v}" for k, v in zip(SOURCE_KEYS[kind], key,
                                                                     strict=True))  # fmt: skip


def resolve_sources(
    store: Store,
    runs: list[int] | None,
    selection: Selection,
    filters: Filters,
    queries: list[int] | None = None,
) -> tuple[list[dict], str]:
    """The source row of each set and the setting they share, or a UsageError naming the
    mismatch. Explicit `queries` are checked; otherwise each run's newest source of the one
    setting (key and corruption) that every run has."""
    kind = source_kind(selection)
    _check_filters(kind, filters)
    if queries is not None:
        chosen = _explicit(store, kind, runs, queries, filters)
    else:
        if not runs or len(runs) < 2:
            raise UsageError("give at least two runs to compare, e.g. --runs 1,2")
        if len(set(runs)) != len(runs):
            raise UsageError(f"--runs {','.join(map(str, runs))}: each run may appear once")
        chosen = _common(store, kind, runs, filters)
    _same_corruption(chosen)
    _same_key(chosen, kind)
    return chosen, setting_of(kind, chosen[0])


def setting_of(kind: str, row: dict) -> str:
    """The setting a source belongs to, as the `setting` column writes it."""
    key = describe_key(kind, key_of(row, kind))
    return f"{PLURAL[kind]} with {key}, corruption {row['corruption']}"


def _explicit(
    store: Store, kind: str, runs: list[int] | None, queries: list[int], filters: Filters
) -> list[dict]:
    if filters.given():
        flags = ", ".join(f"--{k}" for k in filters.given())
        raise UsageError(f"--queries names the sets itself; leave out {flags}")
    if len(queries) < 2:
        raise UsageError("give at least two ids to compare, e.g. --queries 1,2")
    rows = store._trusted_query(f"SELECT * FROM ({SOURCES_SQL[kind]})").to_dicts()
    by_id = {r["source_id"]: r for r in rows}
    for q in queries:
        if q in by_id and partial(by_id[q]):
            raise UsageError(
                f"--queries: query {q} patched layers {by_id[q]['layers']} only, and overlap "
                "compares head sets over every layer; give a sweep over all layers"
            )
    unknown = [q for q in queries if q not in by_id]
    if unknown:
        what = {"patch query": "a head patching query", "score set": "an edge-level score set",
                "circuit": "a circuit"}[kind]  # fmt: skip
        raise UsageError(
            f"--queries: {unknown[0]} is not {what} in {store.path}; see: select query_id, kind, "
            "run_id, params from queries"
        )
    chosen = [by_id[q] for q in queries]
    their_runs = [r["run_id"] for r in chosen]
    if runs is not None and list(runs) != their_runs:
        raise UsageError(
            f"--queries {','.join(map(str, queries))} belong to runs "
            f"{','.join(map(str, their_runs))}, not --runs {','.join(map(str, runs))}; give "
            "--queries alone"
        )
    if len(set(their_runs)) != len(their_runs):
        raise UsageError(
            f"--queries {','.join(map(str, queries))}: two of them are of one run; compare "
            "different runs"
        )
    return chosen


def _common(store: Store, kind: str, runs: list[int], filters: Filters) -> list[dict]:
    """Per run its newest source under the one key that every run has (filters applied)."""
    asked = filters
    if kind == "patch query" and filters.component is None:
        filters = replace(filters, component="head")
    rows = candidates(store, kind, filters)
    per_run = {run: [r for r in rows if r["run_id"] == run] for run in runs}
    for run, found in per_run.items():
        if not found:
            _none_for(store, kind, run, asked, filters)
    keys = [dict.fromkeys(key_of(r, kind) for r in per_run[run]) for run in runs]
    common = [k for k in keys[0] if all(k in other for other in keys[1:])]
    if not common:
        newest = "; ".join(
            f"run {run}: {describe_key(kind, key_of(per_run[run][0], kind))} "
            f"({kind} {per_run[run][0]['source_id']})"
            for run in runs
        )
        raise UsageError(
            f"no {kind} setting is common to runs {', '.join(map(str, runs))} ({newest}); "
            f"overlap compares like with like: make matching {PLURAL[kind]} or choose them with "
            "--queries"
        )
    if len(common) > 1:
        raise UsageError(
            f"runs {', '.join(map(str, runs))} share {PLURAL[kind]} under {len(common)} settings ("
            + "; ".join(describe_key(kind, k) for k in common)
            + f"); choose one with {_choose_flags(kind)} or give --queries"
        )
    return [next(r for r in per_run[run] if key_of(r, kind) == common[0]) for run in runs]


def _choose_flags(kind: str) -> str:
    if kind == "patch query":
        return "--metric/--direction/--window"
    return "--method/--metric"


def _none_for(store: Store, kind: str, run: int, asked: Filters, filters: Filters) -> None:
    """The error for a run without a matching source, naming the command that makes one."""
    store.run(run, complete=False)
    asked_for = asked.given()
    with_ = f" with {', '.join(f'{k} {v}' for k, v in asked_for.items())}" if asked_for else ""
    given = filters.given()
    flags = " ".join(f"--{k} {v}" for k, v in given.items())
    fix = {
        "patch query": f"run actstore patch {store.path} --run {run} {flags}",
        "score set": f"run actstore attribute {store.path} --run {run} "
        f"--method {given.get('method', 'eap-ig')} --level edge",
        "circuit": f"run actstore circuit {store.path} --scores ID --edges N (score ids: select "
        f"* from queries where kind = 'attribute' and run_id = {run})",
    }[kind]
    what = {"patch query": "head patching query", "score set": "edge attribution scores",
            "circuit": "circuit"}[kind]  # fmt: skip
    raise UsageError(f"run {run} has no {what}{with_}; {fix.strip()}")


def _same_corruption(chosen: list[dict]) -> None:
    kinds = dict.fromkeys(r["corruption"] for r in chosen)
    if len(kinds) > 1:
        runs = ", ".join(f"run {r['run_id']}: {r['corruption']}" for r in chosen)
        raise UsageError(
            f"the runs differ in corruption ({runs}); overlap compares like with like: choose "
            "runs of one corruption"
        )


def _same_key(chosen: list[dict], kind: str) -> None:
    first = chosen[0]
    for row in chosen[1:]:
        for name in SOURCE_KEYS[kind]:
            if row[name] != first[name]:
                raise UsageError(
                    f"{kind} {first['source_id']} (run {first['run_id']}) and {kind} "
                    f"{row['source_id']} (run {row['run_id']}) differ in {name} "
                    f"({first[name]} vs {row[name]}); overlap compares like with like: give "
                    f"{PLURAL[kind]} with equal {', '.join(SOURCE_KEYS[kind])}"
                )


def overlap(
    store: Store,
    runs: list[int] | None,
    selection: Selection,
    queries: list[int] | None = None,
    **filters: str | int | None,
) -> pl.DataFrame:
    """Overlap statistics over every ordered pair of the runs' sets (diagonal included).

    Sets come from `queries` (patch query, score set or circuit ids) or, per run, from its
    newest source of the one setting all runs share; `filters` are the fields of Filters
    (metric, component, direction, window, method). The `setting` column says what was compared.
    """
    chosen, setting = resolve_sources(store, runs, selection, Filters(**filters), queries)
    sets = [(r["run_id"], r["source_id"]) for r in chosen]
    return _pair_statistics(store, sets, selection).with_columns(pl.lit(setting).alias("setting"))


def sizes(df: pl.DataFrame, selection: Selection) -> str:
    """The sets' size k and their universe, shown beside every IoU: `top 4 heads: sets of
    k = 4 heads of 16`."""
    diagonal = df.filter(pl.col("run_a") == pl.col("run_b"))
    counts = sorted(set(diagonal["n_a"].to_list()))
    k = str(counts[0]) if len(counts) == 1 else "–".join(map(str, (counts[0], counts[-1])))
    return f"{selection.describe()}: sets of k = {k} {selection.items} of {df['universe'][0]}"


def few_items(df: pl.DataFrame, selection: Selection) -> str | None:
    """A warning when a set holds fewer than FEW_ITEMS items (its IoU is nearly all chance)."""
    diagonal = df.filter(pl.col("run_a") == pl.col("run_b"), pl.col("n_a") < FEW_ITEMS)
    if diagonal.is_empty():
        return None
    small = ", ".join(f"run {r} has {n}" for r, n in diagonal.select("run_a", "n_a").rows())
    return (
        f"warning: sets of fewer than {FEW_ITEMS} {selection.items} ({small}): one item more or "
        f"less moves their IoU between 0 and 1; choose larger sets, e.g. top "
        f"{DEFAULT_FLOOR[selection.by]} {selection.items}"
    )


def compared(df: pl.DataFrame) -> str:
    """One line naming the setting compared and each run's source: what the CLI prints."""
    setting = df["setting"][0]
    kind = next(k for k, plural in PLURAL.items() if setting.startswith(plural))
    diagonal = df.filter(pl.col("run_a") == pl.col("run_b"))
    used = ", ".join(f"run {r} {kind} {s}" for r, s in diagonal.select("run_a", "source_a").rows())
    return f"compared {setting}: {used}"


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


def _sets_sql(sets: list[tuple[int, int]], selection: Selection) -> tuple[str, list]:
    """CTEs `sets(set_idx, run_id, source_id, task, universe)` and `members(set_idx, item)` of
    explicit (run_id, source_id) sets, and their parameters."""
    members, member_params = selection.members_sql()
    values = ", ".join("(?, ?, ?)" for _ in sets)
    set_params = [v for i, (run, source) in enumerate(sets) for v in (i, run, source)]
    sql = f"""
        given AS (SELECT * FROM (VALUES {values}) s(set_idx, run_id, source_id)),
        sets AS (
            SELECT g.set_idx, g.run_id, g.source_id, r.task, u.universe
            FROM given g LEFT JOIN runs r USING (run_id)
                 LEFT JOIN ({selection.universe_sql()}) u USING (source_id)
        ),
        members AS (
            SELECT s.set_idx, m.item FROM sets s JOIN ({members}) m USING (source_id)
        )"""
    return sql, [*set_params, *member_params]


def _pair_statistics(
    store: Store, sets: list[tuple[int, int]], selection: Selection
) -> pl.DataFrame:
    """Overlap of (run_id, source_id) sets, computed in one statement."""
    ctes, params = _sets_sql(sets, selection)
    df = store._trusted_query(f"WITH {ctes}, {PAIRS_SQL}", params)
    _check_universe(df, selection)
    return with_p_values(df.drop("universe_b").rename({"universe_a": "universe"}))


def with_shared(store: Store, df: pl.DataFrame, selection: Selection) -> pl.DataFrame:
    """The overlap rows with `shared`: the items of A∩B (head or edge names), sorted."""
    diagonal = df.filter(pl.col("run_a") == pl.col("run_b"))
    sets = list(diagonal.select("run_a", "source_a").iter_rows())
    ctes, params = _sets_sql(sets, selection)
    shared = store._trusted_query(
        f"""
        WITH {ctes}
        SELECT sa.run_id AS run_a, sb.run_id AS run_b, list(a.item ORDER BY a.item) AS shared
        FROM members a JOIN members b USING (item)
             JOIN sets sa ON sa.set_idx = a.set_idx JOIN sets sb ON sb.set_idx = b.set_idx
        GROUP BY ALL
        """,
        params,
    )
    out = df.join(shared, on=["run_a", "run_b"], how="left", maintain_order="left")
    return out.with_columns(pl.col("shared").fill_null(pl.lit([], dtype=pl.List(pl.String))))


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
