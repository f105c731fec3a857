"""The edge graph's node and edge names, defined once: `input`, a head `a{layer}.h{head}`, an
MLP `m{layer}`, `logits`, and an edge `src->dst`, with `<q|k|v>` when it enters a head's query,
key or value. Python builds and parses them with the functions and patterns here; the catalog's
views and the report use the SQL forms beside them, so a stored name and a computed one always
agree."""

from __future__ import annotations

import re

INPUT = "input"
LOGITS = "logits"
# A node's kind, from input to logits: the input and the logits are their own kinds.
HEAD, MLP = "head", "mlp"
NODE_KINDS = (INPUT, HEAD, MLP, LOGITS)

# A head's and an MLP's name, as regular expressions (Python's and DuckDB's alike) whose groups
# are the layer and the head.
HEAD_PATTERN = r"a(\d+)\.h(\d+)"
MLP_PATTERN = r"m(\d+)"
HEAD_NAME = re.compile(f"^{HEAD_PATTERN}$")
MLP_NAME = re.compile(f"^{MLP_PATTERN}$")

# The same names as SQL expressions over columns: EDGE_NAME.format(src=..., dst=..., qkv=...).
EDGE_NAME = "{src} || '->' || {dst} || coalesce('<' || {qkv} || '>', '')"
HEAD_NODE = "'a' || {layer} || '.h' || {head}"
MLP_NODE = "'m' || {layer}"

# A node name's parts as SQL over a column: the layer of a head or an MLP, the head of a head
# (NULL otherwise), and its kind.
NODE_LAYER = (
    f"coalesce(TRY_CAST(regexp_extract({{node}}, '^{HEAD_PATTERN}$', 1) AS INTEGER), "
    f"TRY_CAST(regexp_extract({{node}}, '^{MLP_PATTERN}$', 1) AS INTEGER))"
)
NODE_HEAD = f"TRY_CAST(regexp_extract({{node}}, '^{HEAD_PATTERN}$', 2) AS INTEGER)"
NODE_KIND = (
    f"CASE WHEN {{node}} IN ('{INPUT}', '{LOGITS}') THEN {{node}} "
    f"WHEN regexp_full_match({{node}}, '{MLP_PATTERN}') THEN '{MLP}' ELSE '{HEAD}' END"
)


def head_node(layer: int, head: int) -> str:
    return f"a{layer}.h{head}"


def mlp_node(layer: int) -> str:
    return f"m{layer}"
