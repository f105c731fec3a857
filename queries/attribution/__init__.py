"""Gradient attribution over the edge graph (`actstore attribute`) and circuits with their exact
faithfulness (`actstore circuit`).

`graph` names the nodes and edges, `edge_model` runs the edge-patchable forward,
`edge_batches` reads node outputs, `gradients` scores, `attribute` records score sets, `exact`
patches every edge alone, `tree` is the fast exact forward of circuits, `evaluate` measures
circuits' metrics, `circuits` builds and records circuits.
"""

from queries.attribution.attribute import attribute, resolve_params, stored_scores
from queries.attribution.circuits import (
    circuit,
    score_graph,
    stored_circuit,
    stored_curve,
    top_edges,
)
from queries.attribution.graph import Graph

__all__ = [
    "Graph", "attribute", "circuit", "resolve_params", "score_graph", "stored_circuit",
    "stored_curve", "stored_scores", "top_edges",
]  # fmt: skip
