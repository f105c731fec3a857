"""The report's attention section: per `actstore attention` query, a table of heads × the roles
attended to from one role (IOI: END → IO, S1, S2), beside each head's patching rank."""

from __future__ import annotations

import polars as pl

from actstore.core.names import HEAD_NODE
from actstore.core.store import Store
from queries.analysis.report.page import Page, card, esc, table


def attention_queries(store: Store, runs: list[int]) -> pl.DataFrame:
    """Every attention row of the runs' current attention queries (a recomputed one supersedes
    the old), with its run and task; empty for a catalog from before attention."""
    tables = store._trusted_query(
        "SELECT count(*) AS n FROM information_schema.tables WHERE table_name = 'attention' "
        "AND table_catalog = current_database()"
    )
    if not tables["n"][0]:
        return pl.DataFrame()
    return store._trusted_query(
        f"""
        SELECT a.*, {HEAD_NODE.format(layer="a.layer", head="a.head")} AS node, q.run_id,
               q.to_roles, r.task, r.n_prompts
        FROM attention a JOIN query_params q USING (query_id)
             JOIN current_queries c USING (query_id) LEFT JOIN runs r ON r.run_id = q.run_id
        WHERE q.kind = 'attention' AND q.run_id IN (SELECT unnest(?))
        ORDER BY a.query_id, a.layer, a.head
        """,
        [runs],
    )


def patch_ranks(store: Store, run_id: int) -> pl.DataFrame:
    """Each head's rank in the run's first head-patching query (top_heads): layer, head,
    patch_rank (no rows without one)."""
    return store._trusted_query(
        "SELECT layer, head, rank AS patch_rank FROM top_heads WHERE query_id = (SELECT "
        "min(query_id) FROM top_heads WHERE run_id = ? AND component = 'head')",
        [run_id],
    )


def attention_section(page: Page, store: Store, runs: list[int]) -> None:
    cards = []
    rows = attention_queries(store, runs)
    if rows.height:
        for (query_id,), part in rows.partition_by("query_id", as_dict=True).items():
            first = part.row(0, named=True)
            to = first["to_roles"].split(",")
            wide = part.pivot(on="to_role", index=["layer", "head", "node"], values="value")
            wide = wide.sort("layer", "head")
            ranks = patch_ranks(store, first["run_id"]).cast({"layer": pl.Int32, "head": pl.Int32})
            wide = wide.cast({"layer": pl.Int32, "head": pl.Int32}).join(
                ranks, on=["layer", "head"], how="left"
            )
            wide = wide.sort(pl.col(to[0]), descending=True)
            columns = {"node": "head", **{r: f"{first['from_role']} → {r}" for r in to},
                       "patch_rank": "head-patching rank"}  # fmt: skip
            heading = (
                f"attention query {query_id} · run {first['run_id']} {first['task']} · from "
                f"{first['from_role']}"
            )
            meta = esc(
                f"{first['side']} run, mean over {first['n_prompts']} prompts, each read at its "
                f"own positions of the roles; heads sorted by attention to {to[0]}"
            )
            cards.append(card(heading, meta, table(wide, columns, numbers=to)))
    page.section(
        "attention", "Attention by role",
        "Where each head looks from one token role to others (e.g. from END to IO, S1 and S2 "
        "in IOI): the attention probability, averaged over prompts, each prompt at its own "
        "positions of the roles, recomputed from the stored residual stream. The last column "
        "is the head's rank in the run's head patching, so heads that both attend to a role "
        "and move the metric stand out.",
        cards,
        "No attention queries for these runs; run actstore attention STORE --run R --from END.",
    )  # fmt: skip
