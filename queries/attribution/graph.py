"""The edge graph of a transformer, named as in Hanna et al.'s EAP-IG.

Nodes: `input` (token + position embeddings), every attention head `a{l}.h{h}`, every MLP `m{l}`,
and `logits`. An edge runs from an upstream node's output to a downstream node's input; a head
has three inputs (q, k, v), so it is the destination of three edges per upstream node.

Scores live in one (n_forward, n_backward) array, as in EAP-IG's `Graph`: row = source node
(forward index), column = destination input (backward index); `real` marks the cells that are
edges (the source lies upstream of the destination). The layout of both axes:

    forward:  input, a0.h0 … a0.h{H-1}, m0, a1.h0 …, m{L-1}
    backward: per layer l: a{l}.h* <q>, a{l}.h* <k>, a{l}.h* <v>, m{l}; then logits

A head at layer l reads the input and every node of layers < l; the MLP at layer l also reads the
heads of layer l, except under parallel attention and MLP (GPT-NeoX, GPT-J), where both read the
block's input; logits read everything. GPT-2 small (12 layers, 12 heads) has 32,491 edges.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property
from typing import Any

import numpy as np
import polars as pl

from actstore.core.names import INPUT, LOGITS, head_node, mlp_node

QKV = ("q", "k", "v")


@dataclass(frozen=True)
class Graph:
    """Node names, index layouts and the edge mask of one architecture (no weights needed)."""

    n_layers: int
    n_heads: int
    parallel: bool = False

    @classmethod
    def of(cls, arch: Any) -> Graph:
        """The graph of an `actstore.model.architecture.Architecture`."""
        return cls(arch.n_layers, arch.n_heads, arch.parallel)

    @classmethod
    def from_config(cls, cfg: Any) -> Graph:
        """From a TransformerLens config / ModelShape (n_layers, n_heads) or an HF GPT2Config."""
        layers = getattr(cfg, "n_layers", None) or getattr(cfg, "n_layer", None)
        heads = getattr(cfg, "n_heads", None) or getattr(cfg, "n_head", None)
        if layers is None or heads is None:
            raise ValueError(f"config {type(cfg).__name__} has no layer/head counts")
        return cls(int(layers), int(heads))

    @property
    def n_forward(self) -> int:
        return 1 + self.n_layers * (self.n_heads + 1)

    @property
    def n_backward(self) -> int:
        return self.n_layers * (3 * self.n_heads + 1) + 1

    def head_index(self, layer: int, head: int) -> int:
        """Forward index of head (layer, head)."""
        return 1 + layer * (self.n_heads + 1) + head

    def mlp_index(self, layer: int) -> int:
        """Forward index of MLP `layer`."""
        return 1 + layer * (self.n_heads + 1) + self.n_heads

    def layer_start(self, layer: int) -> int:
        """Backward index of layer `layer`'s first input (head 0's q)."""
        return layer * (3 * self.n_heads + 1)

    @cached_property
    def forward_names(self) -> list[str]:
        names = [INPUT]
        for layer in range(self.n_layers):
            names += [head_node(layer, h) for h in range(self.n_heads)] + [mlp_node(layer)]
        return names

    @cached_property
    def backward_names(self) -> list[tuple[str, str | None]]:
        """(destination node, qkv or None) per backward index."""
        names: list[tuple[str, str | None]] = []
        for layer in range(self.n_layers):
            for letter in QKV:
                names += [(head_node(layer, h), letter) for h in range(self.n_heads)]
            names.append((mlp_node(layer), None))
        names.append((LOGITS, None))
        return names

    @cached_property
    def n_upstream(self) -> np.ndarray:
        """For each backward index, how many forward nodes (a prefix) feed it."""
        out = []
        for layer in range(self.n_layers):
            out += [1 + layer * (self.n_heads + 1)] * (3 * self.n_heads)
            out.append(self.head_index(layer, 0) if self.parallel else self.mlp_index(layer))
        out.append(self.n_forward)
        return np.asarray(out, dtype=np.int64)

    @cached_property
    def real(self) -> np.ndarray:
        """(n_forward, n_backward) bool: which cells are edges."""
        return np.arange(self.n_forward)[:, None] < self.n_upstream[None, :]

    @property
    def n_edges(self) -> int:
        return int(self.n_upstream.sum())

    @cached_property
    def edge_cells(self) -> tuple[np.ndarray, np.ndarray]:
        """(forward, backward) indices of every edge, in a fixed order (row-major)."""
        return np.nonzero(self.real)

    def edge_frame(self, scores: np.ndarray) -> pl.DataFrame:
        """Rows (src, dst, qkv, score) of every edge; qkv is null for MLP and logits inputs."""
        if scores.shape != (self.n_forward, self.n_backward):
            raise ValueError(f"scores shape {scores.shape} does not fit the graph")
        rows, cols = self.edge_cells
        fwd = np.asarray(self.forward_names, dtype=object)
        dst = np.asarray([d for d, _ in self.backward_names], dtype=object)
        qkv = np.asarray([q for _, q in self.backward_names], dtype=object)
        return pl.DataFrame(
            {
                "src": fwd[rows].tolist(),
                "dst": dst[cols].tolist(),
                "qkv": pl.Series(qkv[cols].tolist(), dtype=pl.String),
                "score": scores[rows, cols].astype(np.float64),
            }
        )

    def node_frame(self, scores: np.ndarray) -> pl.DataFrame:
        """Rows (src, dst=null, qkv=null, score) for node-level scores over heads and MLPs."""
        if scores.shape != (self.n_forward,):
            raise ValueError(f"node scores shape {scores.shape} does not fit the graph")
        return pl.DataFrame(
            {
                "src": self.forward_names[1:],
                "dst": pl.Series([None] * (self.n_forward - 1), dtype=pl.String),
                "qkv": pl.Series([None] * (self.n_forward - 1), dtype=pl.String),
                "score": scores[1:].astype(np.float64),
            }
        )

    def cell_of(self, src: str, dst: str, qkv: str | None) -> tuple[int, int]:
        """(forward, backward) index of a named edge; KeyError if it is not an edge."""
        f = self._forward_lookup[src]
        b = self._backward_lookup[(dst, qkv)]
        if not self.real[f, b]:
            raise KeyError(f"{src}->{dst}<{qkv}> is not an edge")
        return f, b

    @cached_property
    def _forward_lookup(self) -> dict[str, int]:
        return {n: i for i, n in enumerate(self.forward_names)}

    @cached_property
    def _backward_lookup(self) -> dict[tuple[str, str | None], int]:
        return {n: i for i, n in enumerate(self.backward_names)}
