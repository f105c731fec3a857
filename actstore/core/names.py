"""The edge graph's node and edge names, defined once: `input`, a head `a{layer}.h{head}`, an
MLP `m{layer}`, `logits`, and an edge `src->dst`, with `<q|k|v>` when it enters a head's query,
key or value. Python builds them with the functions here; the catalog's views and the report
use the SQL forms beside them, so a stored name and a computed one always agree."""

from __future__ import annotations

INPUT = "input"
LOGITS = "logits"

# The same names as SQL expressions over columns: EDGE_NAME.format(src=..., dst=..., qkv=...).
EDGE_NAME = "{src} || '->' || {dst} || coalesce('<' || {qkv} || '>', '')"
HEAD_NODE = "'a' || {layer} || '.h' || {head}"


def head_node(layer: int, head: int) -> str:
    return f"a{layer}.h{head}"


def mlp_node(layer: int) -> str:
    return f"m{layer}"
