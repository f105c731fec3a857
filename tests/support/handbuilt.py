"""A store with hand-built result rows (no model): patching effects, edge scores, circuits and a
faithfulness curve whose overlap statistics are worked out by hand in the tests.

Model `hand`: 3 layers × 4 heads = 12 heads. Head effects (normalized) rank, per run:
  run 1 (ioi):             a0.h1 0.9, a2.h3 -0.8, a1.h0 0.7, then small
  run 2 (colored-objects): a2.h3 0.95, a0.h1 0.85, a2.h0 -0.6, then small
so the top-3 sets share {a0.h1, a2.h3}: |A∩B| = 2, |A∪B| = 4.
Edges: 10 scored edges per run; the top-4 sets share 3 edges.
"""

from __future__ import annotations

import json
from pathlib import Path

import polars as pl

from actstore.core.results import record_query
from actstore.core.store import Store

N_LAYERS, N_HEADS = 3, 4
EFFECTS = {
    1: {(0, 1): 0.9, (2, 3): -0.8, (1, 0): 0.7},
    2: {(2, 3): 0.95, (0, 1): 0.85, (2, 0): -0.6},
}
EDGES = [
    ("input", "a0.h1", "q"),
    ("input", "a0.h1", "v"),
    ("a0.h1", "a1.h0", "k"),
    ("a0.h1", "m1", None),
    ("m1", "a2.h3", "q"),
    ("a1.h0", "a2.h3", "v"),
    ("a2.h3", "logits", None),
    ("m0", "logits", None),
    ("a2.h0", "logits", None),
    ("input", "m0", None),
]
# Scores in EDGES order: run 1's top 4 are edges 6, 5, 4, 3; run 2's are 6, 5, 4, 8.
SCORES = {
    1: [0.01, -0.02, 0.03, 0.5, -0.6, 0.7, 0.9, 0.04, 0.05, 0.06],
    2: [0.01, 0.02, -0.03, 0.04, 0.6, -0.7, 0.8, 0.05, 0.55, 0.06],
}
EFFECT_SCHEMA = {"layer": pl.Int32, "head": pl.Int32, "pos": pl.Int32, "metric": pl.String,
                 "value": pl.Float64, "normalized": pl.Float64}  # fmt: skip
CURVE = [(1, 0.2), (2, 0.45), (4, 0.8), (8, 0.97), (10, 1.0)]


def head_effects(run: int) -> pl.DataFrame:
    """Every head of the model, with the planted effects and a small remainder."""
    rows = []
    for layer in range(N_LAYERS):
        for head in range(N_HEADS):
            norm = EFFECTS[run].get((layer, head), 0.01 * (layer * N_HEADS + head) / 12)
            rows.append((layer, head, None, "logit-diff", 1.0 + 2.0 * norm, norm))
    return pl.DataFrame(rows, schema=EFFECT_SCHEMA, orient="row")


def noise_effects(run: int) -> pl.DataFrame:
    """The same heads patched by noising: a head that matters moves the clean run's normalised
    metric away from 1 by its planted effect; the rest barely move it (normalized ≈ 0.9999)."""
    rows = []
    for layer in range(N_LAYERS):
        for head in range(N_HEADS):
            shift = EFFECTS[run].get((layer, head), 1e-4 * (layer * N_HEADS + head + 1) / 12)
            rows.append((layer, head, None, "kl", 3.0 * shift, 1.0 - shift))
    return pl.DataFrame(rows, schema=EFFECT_SCHEMA, orient="row")


def record_noise(store: Store, run: int) -> int:
    """A KL noising head query of `run` (the hand store's runs 1 and 2)."""
    params = {"component": "head", "metric": "kl", "direction": "noise", "window": 1}
    return record_query(store, "patch", run, params, 0.1, {"effects": noise_effects(run)})


def resid_effects() -> pl.DataFrame:
    """A position × layer residual-stream patching result (5 positions)."""
    rows = [
        (layer, None, pos, "logit-diff", 0.0, (pos + 1) * (layer + 1) / 20)
        for layer in range(N_LAYERS)
        for pos in range(5)
    ]
    return pl.DataFrame(rows, schema=EFFECT_SCHEMA, orient="row")


def edge_scores(run: int) -> pl.DataFrame:
    return pl.DataFrame(
        {
            "run_id": [run] * len(EDGES),
            "method": ["eap-ig"] * len(EDGES),
            "src": [e[0] for e in EDGES],
            "dst": [e[1] for e in EDGES],
            "qkv": [e[2] for e in EDGES],
            "score": SCORES[run],
        },
        schema_overrides={"run_id": pl.Int32, "qkv": pl.String},
    )


def insert_by_name(store: Store, table: str, frame: pl.DataFrame) -> None:
    """Insert rows naming their columns: result tables may have more columns than tests set."""
    with store.writer(), store.catalog.write() as con:
        con.register("incoming", frame.to_arrow())
        con.execute(f"INSERT INTO {table} BY NAME SELECT * FROM incoming")
        con.unregister("incoming")


def record_circuit(
    store: Store, run: int, score_id: int, edges: list[tuple[str, str, str | None]], faith: float
) -> int:
    """A circuit query with its circuits and circuit_edges rows."""
    circuit_id = record_query(store, "circuit", run, {"scores": score_id, "edges": len(edges)},
                              0.3, {})  # fmt: skip
    for table, frame in circuit(score_id, edges, faith).items():
        insert_by_name(store, table, frame.with_columns(pl.lit(circuit_id).alias("circuit_id")))
    return circuit_id


def circuit(score_id: int, edges: list[tuple[str, str, str | None]], faith: float) -> dict:
    return {
        "circuits": pl.DataFrame(
            {
                "score_id": [score_id],
                "n_edges": [len(edges)],
                "faithfulness": [faith],
                "params": [json.dumps({"edges": len(edges)})],
                "created_at": [None],
            },
            schema_overrides={"created_at": pl.Datetime, "n_edges": pl.Int32},
        ),  # fmt: skip
        "circuit_edges": pl.DataFrame(
            {
                "src": [e[0] for e in edges],
                "dst": [e[1] for e in edges],
                "qkv": [e[2] for e in edges],
            },
            schema_overrides={"qkv": pl.String},
        ),  # fmt: skip
    }


def insert_models(con, rows: list[tuple]) -> None:
    """`models` rows (model, n_layers, n_heads, d_model[, d_head, d_mlp]): the widths queries
    check options against."""
    for row in rows:
        values = (*row, None, None)[:6]
        con.execute(
            "INSERT INTO models (model, n_layers, n_heads, d_model, d_head, d_mlp) "
            "VALUES (?, ?, ?, ?, ?, ?)",
            list(values),
        )


def insert_run(con, run: int, model: str, task: str, n: int, batch_size: int | None = None) -> None:
    """A complete run's row: `n` prompts, no parameters, no hooks."""
    con.execute(
        "INSERT INTO runs (run_id, model, task, corruption, n_prompts, status, params, hooks, "
        "batch_size) VALUES (?, ?, ?, 'str', ?, 'complete', '{}', '[]', ?)",
        [run, model, task, n, batch_size],
    )


def build(path: Path) -> dict[str, int]:
    """Create the store; returns the ids of what it holds by name."""
    store = Store(path, create=True)
    with store.writer(), store.catalog.write() as con:
        insert_models(con, [("hand", N_LAYERS, N_HEADS, 16), ("other", 2, 2, 8)])
        for run, task, model in [(1, "ioi", "hand"), (2, "colored-objects", "hand"),
                                 (3, "ioi", "hand"), (4, "ioi", "other")]:  # fmt: skip
            insert_run(con, run, model, task, 20)
    ids: dict[str, int] = {}
    for run in (1, 2):
        params = {"component": "head", "metric": "logit-diff", "direction": "denoise"}
        ids[f"patch{run}"] = record_query(
            store, "patch", run, params, 0.1, {"effects": head_effects(run)}
        )
    ids["resid1"] = record_query(
        store, "patch", 1, {"component": "resid", "metric": "logit-diff", "direction": "denoise"},
        0.1, {"effects": resid_effects()},
    )  # fmt: skip
    ids["patch4"] = record_query(
        store, "patch", 4, {"component": "head", "metric": "logit-diff", "direction": "denoise"},
        0.1, {"effects": head_effects(1).filter(pl.col("layer") < 2, pl.col("head") < 2)},
    )  # fmt: skip
    for run in (1, 2):
        score = record_query(
            store, "attribute", run,
            {"method": "eap-ig", "steps": 5, "level": "edge", "metric": "logit-diff"}, 0.2,
            {"edge_scores": edge_scores(run)},
        )  # fmt: skip
        curve = pl.DataFrame(
            {"score_id": [score] * len(CURVE), "n_edges": [n for n, _ in CURVE],
             "faithfulness": [f for _, f in CURVE]},
            schema_overrides={"score_id": pl.Int32, "n_edges": pl.Int32},
        )  # fmt: skip
        insert_by_name(store, "faithfulness_curve", curve)
        ids[f"scores{run}"] = score
        top = sorted(range(len(EDGES)), key=lambda i: -abs(SCORES[run][i]))[:4]
        ids[f"circuit{run}"] = record_circuit(
            store, run, score, [EDGES[i] for i in top], 0.8 + 0.1 * run
        )
    return ids


def add_path_attention_and_exact(store: Store) -> dict[str, int]:
    """Rows for the views of the later query families, on top of `build`'s: a path query and an
    attention and head-class query of run 1, and two edge score sets of run 3 (EAP and exact
    effects) on the same edges, for the views that compare score sets; run 1's prompts and
    roles (LABELLED's run 1), for position_labels."""
    path_rows = pl.DataFrame(
        [("a0.h1", "a2.h3", "q", "END", "logit-diff", 1.4, 0.2),
         ("m1", "a2.h3", "q", "END", "logit-diff", 1.1, -0.05),
         ("a0.h1", "logits", None, "END", "logit-diff", 1.6, 0.3)],
        schema={"sender": pl.String, "receiver": pl.String, "qkv": pl.String, "role": pl.String,
                "metric": pl.String, "value": pl.Float64, "normalized": pl.Float64},
        orient="row",
    )  # fmt: skip
    ids = {"path1": record_query(
        store, "path", 1, {"senders": "all", "receivers": "a2.h3:q,logits", "direction": "denoise"},
        0.1, {"path_effects": path_rows},
    )}  # fmt: skip
    attention = pl.DataFrame(
        [(layer, head, "END", "IO", "clean", 0.1 * (layer * N_HEADS + head) / 12)
         for layer in range(N_LAYERS) for head in range(N_HEADS)],
        schema={"layer": pl.Int32, "head": pl.Int32, "from_role": pl.String,
                "to_role": pl.String, "side": pl.String, "value": pl.Float64},
        orient="row",
    )  # fmt: skip
    ids["attention1"] = record_query(store, "attention", 1, {"from": "END", "to": ["IO"]}, 0.1,
                                     {"attention": attention})  # fmt: skip
    classes = pl.DataFrame(
        [(layer, head, name, "clean", 0.05 * (layer + head + i))
         for layer in range(N_LAYERS) for head in range(N_HEADS)
         for i, name in enumerate(["previous-token", "duplicate-token", "induction"])],
        schema={"layer": pl.Int32, "head": pl.Int32, "class": pl.String, "side": pl.String,
                "value": pl.Float64},
        orient="row",
    )  # fmt: skip
    ids["heads1"] = record_query(store, "heads", 1, {}, 0.1, {"head_scores": classes})
    for method, scale in [("eap", 1.0), ("exact", 0.8)]:
        scores = edge_scores(1).with_columns(
            pl.lit(3, dtype=pl.Int32).alias("run_id"), pl.lit(method).alias("method"),
            pl.col("score") * scale + pl.Series([0.01 * i for i in range(len(EDGES))]),
        )  # fmt: skip
        ids[f"{method}3"] = record_query(
            store, "attribute", 3, {"method": method, "level": "edge", "metric": "logit-diff"},
            0.2, {"edge_scores": scores},
        )  # fmt: skip
    with store.writer(), store.catalog.write() as con:  # prompts and roles: position_labels
        insert_prompts(con, 1, LABELLED[1])
    return ids


def version_one_store(path: Path) -> Path:
    """A store whose catalog a version-1 actstore wrote (before answer sets, architectures and
    roles): one complete run of two prompts, no arrays."""
    import duckdb

    from actstore.core.catalog import MIGRATIONS

    path.mkdir(parents=True)
    con = duckdb.connect(str(path / "catalog.duckdb"))
    for statement in MIGRATIONS[0]:
        con.execute(statement)
    con.execute("INSERT INTO meta VALUES ('schema_version', '1')")
    con.execute(
        "INSERT INTO runs (run_id, model, task, corruption, n_prompts, status, params, hooks) "
        "VALUES (1, 'toy', 'ioi', 'str', 2, 'complete', '{}', '[]')"
    )
    con.execute(
        "INSERT INTO prompts (run_id, prompt_idx, answer, wrong_answer, answer_token, "
        "wrong_answer_token) VALUES (1, 0, 'Mary', 'John', 7, 9), (1, 1, 'are', 'is', 4, 5)"
    )
    con.close()
    return path


# Two runs of two prompts each for position labels (no model, no arrays): run 1's prompts share
# one length, run 2's differ; IO sits at 2 in every prompt, X at 1 in one and 3 in the other.
WORDS = {0: "<bos>", 10: " When", 11: " Mary", 12: " and", 13: " to", 14: " John"}
LABELLED = {
    1: [([0, 10, 11, 12, 13], {"IO": 2, "X": 1}), ([0, 10, 14, 12, 13], {"IO": 2, "X": 3})],
    2: [([0, 10, 11, 13], {"IO": 2, "X": 1}), ([0, 10, 14, 12, 13], {"IO": 2, "X": 3})],
}


def labelled(path: Path) -> Store:
    """A store of the LABELLED runs: prompts with their token texts and roles (END the final
    token), and on run 1 a residual patching query at positions 0..4."""
    store = Store(path, create=True)
    with store.writer(), store.catalog.write() as con:
        con.execute(
            "INSERT INTO models (model, n_layers, n_heads, d_model) VALUES ('hand', 3, 4, 16)"
        )
        for run, prompts in LABELLED.items():
            params = json.dumps({"roles": {"names": ["IO", "X", "END"]}})
            con.execute(
                "INSERT INTO runs (run_id, model, task, corruption, n_prompts, status, params, "
                "hooks) VALUES (?, 'hand', 'ioi', 'str', 2, 'complete', ?, '[]')",
                [run, params],
            )
            insert_prompts(con, run, prompts)
    params = {"component": "resid", "metric": "logit-diff", "direction": "denoise"}
    record_query(store, "patch", 1, params, 0.1, {"effects": resid_effects()})
    return store


def insert_prompts(con, run: int, prompts: list[tuple[list[int], dict[str, int]]]) -> None:
    """`prompts` and `prompt_roles` rows of a run: each prompt's tokens (texts from WORDS) and
    roles, END its final token."""
    for i, (tokens, roles) in enumerate(prompts):
        con.execute(
            "INSERT INTO prompts (run_id, prompt_idx, seq_len, clean_tokens, clean_token_texts) "
            "VALUES (?, ?, ?, ?, ?)",
            [run, i, len(tokens), tokens, [WORDS[t] for t in tokens]],
        )
        for role, pos in {**roles, "END": len(tokens) - 1}.items():
            con.execute("INSERT INTO prompt_roles VALUES (?, ?, ?, ?)", [run, i, role, pos])


def long_prompts(path: Path, n: int, batch_size: int = 8, text_chars: int = 2000) -> Store:
    """A store of one complete run of `n` prompts (model `hand`, no arrays) with long texts, as
    real runs have beside the few numbers a query reads: prompt i has seq_len 4 + i % 3, answer
    token i, wrong answer token i + 1, answer set [i, i + 2], wrong set [i + 1], grp "g{i % 3}"."""
    store = Store(path, create=True)
    with store.writer(), store.catalog.write() as con:
        insert_models(con, [("hand", N_LAYERS, N_HEADS, 16, 4, 64)])
        insert_run(con, 1, "hand", "ioi", n, batch_size)
    idx = list(range(n))
    words = [f" word{w}" for w in range(text_chars // 8)]
    prompts = pl.DataFrame(
        {"run_id": [1] * n, "prompt_idx": idx,
         "clean_text": [f"{i}:" + "c" * text_chars for i in idx],
         "corrupted_text": [f"{i}:" + "x" * text_chars for i in idx],
         "clean_token_texts": [words] * n, "seq_len": [4 + i % 3 for i in idx],
         "answer_token": idx, "wrong_answer_token": [i + 1 for i in idx],
         "answer_tokens": [[i, i + 2] for i in idx], "wrong_answer_tokens": [[i + 1] for i in idx],
         "grp": [f"g{i % 3}" for i in idx]},
        schema_overrides={"run_id": pl.Int32, "prompt_idx": pl.Int32, "seq_len": pl.Int32,
                          "answer_token": pl.Int32, "wrong_answer_token": pl.Int32,
                          "answer_tokens": pl.List(pl.Int32),
                          "wrong_answer_tokens": pl.List(pl.Int32)},
    )  # fmt: skip
    insert_by_name(store, "prompts", prompts)
    return store
