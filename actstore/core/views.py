"""SQL views over the catalog's result tables: the common analysis questions as one-liners.

Views are pure SQL over catalog tables, so they live in the core and are (re)created by
`Catalog.migrate` on every write; a reader sees them in any store written by this version.
Their columns are documented in docs/analysis.md; tests pin them.

Ranks are by `importance` (IMPORTANCE below for effects, |score| for edge scores), ties broken
by name so that a top-k set has exactly k members. `frac_rank` = (rank - 1) / n: top-fraction f
is `WHERE frac_rank < f`, which keeps ceil(f·n) items (at least one), e.g. Merullo et al.'s top
2% of heads.
"""

from __future__ import annotations

import json
from typing import Any

from actstore.core.names import EDGE_NAME, HEAD_NODE, MLP_NODE, NODE_HEAD, NODE_LAYER

# What each kind of query records in `queries.params` (JSON), by key and type: read once, by the
# view query_params, whose typed columns every other view, overlap and the report use. Lists
# (layers, positions, senders, …) come out as the options spell them, comma-separated.
PARAM_TYPES: dict[str, str] = {
    # patch (and metric, direction: path, intervene, subspace; metric: attribute, circuit)
    "component": "VARCHAR", "metric": "VARCHAR", "direction": "VARCHAR", "window": "INTEGER",
    "positions": "VARCHAR[]", "layers": "VARCHAR[]", "roles": "VARCHAR[]",
    # attribute; circuit
    "method": "VARCHAR", "steps": "INTEGER", "level": "VARCHAR",
    "scores": "INTEGER", "edges": "INTEGER", "faithfulness": "DOUBLE", "prune": "BOOLEAN",
    # subspace (and hook, side: reduce; side: attention, head classes)
    "hook": "VARCHAR", "head": "INTEGER", "pos": "VARCHAR", "reader": "VARCHAR",
    "basis": "VARCHAR", "basis_sha256": "VARCHAR", "k": "INTEGER", "group_by": "VARCHAR",
    "train_frac": "DOUBLE", "seed": "INTEGER", "epochs": "INTEGER", "lr": "DOUBLE",
    "side": "VARCHAR", "from": "VARCHAR", "to": "VARCHAR[]",
    # path, intervene, reduce
    "senders": "VARCHAR[]", "receivers": "VARCHAR[]", "heads": "VARCHAR[]", "attend": "VARCHAR",
    "at": "VARCHAR", "weight": "DOUBLE", "op": "VARCHAR", "by": "VARCHAR",
    # subspace queries recorded before the rename (LEGACY_KEYS)
    "mode": "VARCHAR", "direction_sha256": "VARCHAR",
}  # fmt: skip

# Parameter keys that a kind of query once recorded under other names, new name -> old name.
# Subspace queries said `mode` for the patching direction and `direction` for the basis. Their
# identity (results.params_hash) is taken under the old names, so that a store's earlier queries
# are found and superseded by equal new ones; query_params reads both spellings.
LEGACY_KEYS: dict[str, dict[str, str]] = {
    "subspace": {"direction": "mode", "basis": "direction", "basis_sha256": "direction_sha256"},
}


def _text(field: str) -> str:
    return f"array_to_string(p.{field}, ',')"


# Renamed keys of LEGACY_KEYS: the old name where the query recorded it (its `mode` is there).
_OLD_SUBSPACE = "q.kind = 'subspace' AND p.mode IS NOT NULL"
QUERY_PARAMS = f"""
    SELECT q.query_id, q.run_id, q.kind,
           p.component, p.metric,
           CASE WHEN {_OLD_SUBSPACE} THEN p.mode ELSE p.direction END AS direction,
           p."window" AS window_size, {_text("positions")} AS positions,
           {_text("layers")} AS layers, {_text("roles")} AS roles,
           p.method, p.steps, p.level,
           p.scores AS score_id, p.edges, p.faithfulness, p.prune,
           p.hook, p.head, p.pos, p.reader,
           CASE WHEN {_OLD_SUBSPACE} THEN p.direction ELSE p.basis END AS basis,
           CASE WHEN {_OLD_SUBSPACE} THEN p.direction_sha256 ELSE p.basis_sha256 END
               AS basis_sha256,
           p.k, p.group_by, p.train_frac, p.seed, p.epochs, p.lr,
           p.side, p."from" AS from_role, {_text("to")} AS to_roles,
           {_text("senders")} AS senders, {_text("receivers")} AS receivers,
           {_text("heads")} AS heads, p.attend, p."at", p.weight, p.op, p."by" AS reduce_by
    FROM (SELECT *, json_transform(params, '{json.dumps(PARAM_TYPES)}') AS p FROM queries) q
    ORDER BY q.query_id
    """


# How much a patch moved the metric away from the patched run's own unpatched value, as a share
# of the clean − corrupted gap: the one ranking quantity for both directions. `normalized` is 1
# for clean-like and 0 for corrupted-like outputs in both directions, so denoising (clean into
# the corrupted run) starts from 0 and noising (corrupted into the clean run) from 1. In Zhang &
# Nanda's terms, a large denoising importance says the component is sufficient to restore the
# behaviour, a large noising importance that it is necessary for it; ranking noising by
# |normalized| would put the components that change nothing (normalized ≈ 1) first.
IMPORTANCE = """CASE {direction} WHEN 'denoise' THEN abs({normalized})
                 WHEN 'noise' THEN abs(1 - {normalized}) END"""

EFFECT_IMPORTANCE = IMPORTANCE.format(direction="qp.direction", normalized="e.normalized")

# The queries that a later query of the same setting supersedes (view current_queries).
SUPERSEDED = "(SELECT query_id FROM queries EXCEPT SELECT query_id FROM current_queries)"

# In creation order: a view comes after the views it reads.
VIEWS: dict[str, str] = {
    # One row per query: its parameters as typed columns (QUERY_PARAMS).
    "query_params": QUERY_PARAMS,
    # The newest query of each setting (kind, run, parameters: `params_hash`): a query asked
    # again with --recompute supersedes the older one, whose rows stay in their tables.
    "current_queries": """
        SELECT * FROM queries q
        WHERE NOT EXISTS (SELECT 1 FROM queries n
                          WHERE n.params_hash = q.params_hash AND n.query_id > q.query_id)
        ORDER BY q.query_id
        """,
    "patch_effects": f"""
        SELECT e.query_id, q.run_id, r.model, r.task, r.corruption,
               qp.component, e.metric, qp.direction, qp.window_size,
               e.layer, e.head, e.pos, e.role,
               CASE WHEN e.head IS NOT NULL THEN {HEAD_NODE.format(layer="e.layer", head="e.head")}
                    WHEN qp.component = 'mlp-out' THEN {MLP_NODE.format(layer="e.layer")}
               END AS node,
               e.value, e.normalized,
               {EFFECT_IMPORTANCE} AS importance
        FROM effects e JOIN current_queries q USING (query_id)
             JOIN query_params qp USING (query_id)
             LEFT JOIN runs r ON r.run_id = q.run_id
        WHERE q.kind = 'patch'
        ORDER BY e.query_id, e.layer, e.head NULLS FIRST, e.pos NULLS FIRST
        """,
    "head_effects": """
        SELECT * FROM patch_effects WHERE head IS NOT NULL
        ORDER BY query_id, layer, head, pos NULLS FIRST
        """,
    "top_heads": """
        WITH per_head AS (
            SELECT query_id, run_id, model, task, corruption, component, metric, direction,
                   window_size, layer, head, node,
                   arg_max(pos, importance) AS pos,
                   arg_max(role, importance) AS role,
                   arg_max(value, importance) AS value,
                   arg_max(normalized, importance) AS normalized,
                   max(importance) AS importance
            FROM head_effects
            GROUP BY ALL
        ), ranked AS (
            SELECT *,
                   row_number() OVER (PARTITION BY query_id
                                      ORDER BY importance DESC NULLS LAST, layer, head)
                       AS rank,
                   count(*) OVER (PARTITION BY query_id) AS n_heads
            FROM per_head
        )
        SELECT *, (rank - 1) / n_heads AS frac_rank FROM ranked ORDER BY query_id, rank
        """,
    # Path patching (queries/paths): importance as for patch effects; senders ranked within each
    # query, receiver and role.
    "path_effects_v": f"""
        WITH scored AS (
            SELECT p.query_id, q.run_id, r.model, r.task, r.corruption,
                   qp.direction,
                   p.sender, p.receiver, p.qkv, p.role, p.metric, p.value, p.normalized,
                   {IMPORTANCE.format(direction="qp.direction", normalized="p.normalized")}
                       AS importance
            FROM path_effects p JOIN current_queries q USING (query_id)
                 JOIN query_params qp USING (query_id)
                 LEFT JOIN runs r ON r.run_id = q.run_id
        )
        SELECT *, row_number() OVER (PARTITION BY query_id, receiver, qkv, role
                                     ORDER BY importance DESC NULLS LAST, sender) AS rank,
               count(*) OVER (PARTITION BY query_id, receiver, qkv, role) AS n_senders
        FROM scored ORDER BY query_id, receiver, qkv NULLS FIRST, role NULLS FIRST, rank
        """,
    # Senders by importance over a whole path query: the largest importance a sender reaches at
    # any receiver and role, where it reaches it, and its rank among the query's senders.
    "top_senders": """
        WITH best AS (
            SELECT query_id, run_id, model, task, corruption, direction, metric, sender,
                   arg_max(receiver, importance) AS receiver, arg_max(qkv, importance) AS qkv,
                   arg_max(role, importance) AS role, arg_max(value, importance) AS value,
                   arg_max(normalized, importance) AS normalized, max(importance) AS importance
            FROM path_effects_v GROUP BY ALL
        )
        SELECT *, row_number() OVER (PARTITION BY query_id
                                     ORDER BY importance DESC NULLS LAST, sender) AS rank
        FROM best ORDER BY query_id, rank
        """,
    "top_edges": f"""
        WITH ranked AS (
            SELECT s.score_id, s.run_id, r.model, r.task, r.corruption, s.method,
                   s.src, s.dst, s.qkv, {EDGE_NAME.format(src="s.src", dst="s.dst", qkv="s.qkv")}
                       AS edge,
                   s.score, abs(s.score) AS importance,
                   row_number() OVER (PARTITION BY s.score_id
                                      ORDER BY abs(s.score) DESC NULLS LAST, s.src, s.dst, s.qkv)
                       AS rank,
                   count(*) OVER (PARTITION BY s.score_id) AS n_edges
            FROM edge_scores s LEFT JOIN runs r ON r.run_id = s.run_id
            WHERE s.score_id NOT IN {SUPERSEDED}
        )
        SELECT *, (rank - 1) / n_edges AS frac_rank FROM ranked ORDER BY score_id, rank
        """,
    # Two edge score sets of one run side by side, per edge (edge rows only, score_a < score_b):
    # signed scores, their average ranks (ties share the mean rank, for Spearman) and importance
    # ranks as top_edges has them (|score|, ties by name, for top-k overlap).
    "score_pairs": """
        WITH edges AS (
            SELECT score_id, run_id, method, src, dst, qkv, score, rank AS importance_rank,
                   rank() OVER (PARTITION BY score_id ORDER BY score)
                       + (count(*) OVER (PARTITION BY score_id, score) - 1) / 2 AS score_rank
            FROM top_edges WHERE dst IS NOT NULL
        )
        SELECT a.run_id, a.score_id AS score_a, b.score_id AS score_b,
               a.method AS method_a, b.method AS method_b, a.src, a.dst, a.qkv, a.edge,
               a.score AS value_a, b.score AS value_b,
               a.score_rank AS score_rank_a, b.score_rank AS score_rank_b,
               a.importance_rank AS rank_a, b.importance_rank AS rank_b
        FROM (SELECT e.*, t.edge FROM edges e JOIN top_edges t
                  ON t.score_id = e.score_id AND t.src = e.src AND t.dst = e.dst
                     AND t.qkv IS NOT DISTINCT FROM e.qkv) a
             JOIN edges b ON b.run_id = a.run_id AND b.score_id > a.score_id AND b.src = a.src
                             AND b.dst = a.dst AND b.qkv IS NOT DISTINCT FROM a.qkv
        ORDER BY a.run_id, score_a, score_b, a.importance_rank
        """,
    # How far one score set is from another on the same edges (e.g. eap against exact): Pearson
    # of the signed scores, Spearman (Pearson of the average ranks), and the share of each set's
    # top-k edges by |score| that the other's top k holds, k = 10, 100 and 2% of the edges.
    "score_agreement": """
        SELECT run_id, score_a, score_b, method_a, method_b, count(*) AS n_edges,
               corr(value_a, value_b) AS pearson,
               corr(score_rank_a, score_rank_b) AS spearman,
               count(*) FILTER (WHERE rank_a <= 10 AND rank_b <= 10) / least(10, count(*))
                   AS top10_overlap,
               count(*) FILTER (WHERE rank_a <= 100 AND rank_b <= 100) / least(100, count(*))
                   AS top100_overlap,
               count(*) FILTER (WHERE rank_a <= ceil(0.02 * n) AND rank_b <= ceil(0.02 * n))
                   / ceil(0.02 * any_value(n)) AS top2pct_overlap
        FROM (SELECT *, count(*) OVER (PARTITION BY score_a, score_b) AS n FROM score_pairs)
        GROUP BY run_id, score_a, score_b, method_a, method_b
        ORDER BY run_id, score_a, score_b
        """,
    "circuit_edges_v": f"""
        SELECT ce.circuit_id, c.score_id, ce.src, ce.dst, ce.qkv,
               {EDGE_NAME.format(src="ce.src", dst="ce.dst", qkv="ce.qkv")} AS edge
        FROM circuit_edges ce LEFT JOIN circuits c USING (circuit_id)
        WHERE ce.circuit_id NOT IN {SUPERSEDED}
        ORDER BY ce.circuit_id, edge
        """,
    "circuit_heads": f"""
        SELECT DISTINCT n.circuit_id, c.score_id,
               {NODE_LAYER.format(node="n.node")} AS layer,
               {NODE_HEAD.format(node="n.node")} AS head, n.node
        FROM (SELECT circuit_id, src AS node FROM circuit_edges
              UNION ALL SELECT circuit_id, dst AS node FROM circuit_edges) n
             LEFT JOIN circuits c USING (circuit_id)
        WHERE {NODE_HEAD.format(node="n.node")} IS NOT NULL
              AND n.circuit_id NOT IN {SUPERSEDED}
        ORDER BY n.circuit_id, layer, head
        """,
    "circuits_v": f"""
        SELECT c.circuit_id, c.score_id, a.run_id, r.model, r.task, r.corruption,
               coalesce(a.method, (SELECT any_value(s.method) FROM edge_scores s
                                   WHERE s.score_id = c.score_id)) AS method,
               c.n_edges,
               (SELECT count(*) FROM circuit_edges ce WHERE ce.circuit_id = c.circuit_id)
                   AS n_edges_stored,
               (SELECT count(*) FROM circuit_heads h WHERE h.circuit_id = c.circuit_id)
                   AS n_heads,
               c.faithfulness, c.params, c.created_at
        FROM circuits c LEFT JOIN query_params a ON a.query_id = c.score_id
             LEFT JOIN runs r ON r.run_id = a.run_id
        WHERE c.circuit_id NOT IN {SUPERSEDED}
        ORDER BY c.circuit_id
        """,
    # Labels of a run's positions (role NULL) and roles (pos: the role's one position where
    # every prompt has it there): a position with the roles every prompt has there and the
    # token every prompt holds there, `4 END:' to'`, `2 IO`, `3:' and'`, `7`; a role with the
    # token every prompt holds at it, `END:' to'`, else its name. A token needs every prompt to
    # hold it at that place, so a mixed-length run's later positions are numbers; prompts
    # recorded before token texts (`prompts.clean_token_texts` NULL) label by role only.
    "position_labels": """
        WITH p AS (
            SELECT run_id, prompt_idx, seq_len, clean_tokens AS tokens, clean_token_texts AS texts
            FROM prompts
        ), n AS (
            SELECT run_id, count(*) AS n, max(seq_len) AS longest,
                   bool_and(texts IS NOT NULL) AS has_texts
            FROM p GROUP BY run_id
        ), places AS (
            SELECT run_id, prompt_idx, role, pos FROM prompt_roles WHERE role <> 'END'
            UNION ALL SELECT run_id, prompt_idx, 'END', seq_len - 1 FROM prompts
        ), common AS (
            SELECT l.run_id, NULL::INTEGER AS at, l.role, count(*) AS k,
                   count(DISTINCT l.pos) AS n_pos, min(l.pos) AS pos,
                   count(DISTINCT p.tokens[l.pos + 1]) AS n_tok,
                   count(DISTINCT p.texts[l.pos + 1]) AS n_text, min(p.texts[l.pos + 1]) AS text
            FROM places l JOIN p USING (run_id, prompt_idx) GROUP BY l.run_id, l.role
            UNION ALL
            SELECT q.run_id, q.at, NULL, count(p.tokens[q.at + 1]), 1, q.at,
                   count(DISTINCT p.tokens[q.at + 1]), count(DISTINCT p.texts[q.at + 1]),
                   min(p.texts[q.at + 1])
            FROM (SELECT run_id, unnest(range(longest)) AS at FROM n) q JOIN p USING (run_id)
            GROUP BY q.run_id, q.at
        ), labelled AS (
            SELECT c.run_id, c.at, c.role, c.pos, c.k = n.n AND c.n_pos = 1 AS fixed,
                   CASE WHEN c.k = n.n AND c.n_tok = 1 AND c.n_text = 1 AND n.has_texts
                        THEN ':''' || replace(c.text, chr(10), '\n') || '''' ELSE '' END AS token
            FROM common c JOIN n USING (run_id)
        )
        SELECT t.run_id, t.at AS pos, NULL::VARCHAR AS role,
               t.at || coalesce(' ' || (
                   SELECT string_agg(r.role, '/' ORDER BY r.role) FROM labelled r
                   WHERE r.run_id = t.run_id AND r.role IS NOT NULL AND r.fixed AND r.pos = t.at
               ), '') || t.token AS label
        FROM labelled t WHERE t.role IS NULL
        UNION ALL
        SELECT run_id, CASE WHEN fixed THEN pos END, role, role || token
        FROM labelled WHERE role IS NOT NULL
        ORDER BY run_id, role NULLS FIRST, pos
        """,
    "attention_heads": f"""
        SELECT a.query_id AS attention_id, q.run_id, r.task, a.layer, a.head,
               {HEAD_NODE.format(layer="a.layer", head="a.head")} AS node,
               a.from_role, a.to_role, a.side, a.value AS attention,
               t.query_id AS patch_id, t.component, t.metric, t.direction, t.importance, t.rank,
               c.previous_token, c.duplicate_token, c.induction
        FROM attention a JOIN current_queries q USING (query_id)
             LEFT JOIN runs r ON r.run_id = q.run_id
             LEFT JOIN top_heads t
                  ON t.run_id = q.run_id AND t.layer = a.layer AND t.head = a.head
             LEFT JOIN (
                 SELECT q2.run_id, h.layer, h.head,
                        max(h.value) FILTER (WHERE h.class = 'previous-token') AS previous_token,
                        max(h.value) FILTER (WHERE h.class = 'duplicate-token')
                            AS duplicate_token,
                        max(h.value) FILTER (WHERE h.class = 'induction') AS induction
                 FROM head_scores h JOIN current_queries q2 USING (query_id)
                 WHERE h.side = 'clean'
                 GROUP BY ALL
             ) c ON c.run_id = q.run_id AND c.layer = a.layer AND c.head = a.head
        ORDER BY a.query_id, a.layer, a.head, t.query_id
        """,
}


def views_hash() -> str:
    """What the catalog records of the views it holds: a command's first write recreates them
    only when this version of actstore defines them differently."""
    import hashlib

    text = "\n".join(f"{name} AS {body}" for name, body in VIEWS.items())
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def create_views(con: Any) -> None:
    """Create or replace every view; idempotent, called inside the migration transaction."""
    for name, body in VIEWS.items():
        con.execute(f"CREATE OR REPLACE VIEW {name} AS {body}")
