"""An edge-patchable forward pass: the engine's blocks where each node's input is a sum of outputs.

The residual stream entering a node is the input embedding plus every upstream node's output
plus the attention output biases b_O of the layers passed (b_O belongs to no head: it is the
same in every run, so it cancels in every clean-vs-corrupted difference and its split among
heads would change no score and no faithfulness). A head's output is its share of the
attention's residual contribution (`Engine.head_outputs`: z·W_O[h], or under Gemma 2's
post-attention norm the normed share, which includes b_O/heads), an MLP's is mlp_out, the input
node's is the embedding (resid_pre of block 0).

Every query head has its own q, k and v inputs. Where query heads share a key/value head
(grouped- or multi-query attention), each query head's key and value are its key/value head's
weights applied to its own k and v inputs: in an unpatched run all copies are equal and the
forward is the model's; an edge into `a{l}.h{h}<k>` is the path through head h's use of the
shared key, and the scores of a group's k (or v) edges from one source sum to the score of the
edge into the shared key/value head.

Patching edges: for a destination d and a kept-edge mask K (n_forward, n_backward),

    input_d = Σ_s out_s(this run) + biases + Σ_{s: K[s,d] = 0} (corrupted_s − out_s(this run))

so an edge in the circuit carries its source's value in this run, an edge outside carries the
corrupted run's value, exactly as in Hanna et al.'s evaluation. With every edge kept this is the
model's ordinary forward; with none kept it is the corrupted run. Under parallel attention and
MLP (GPT-NeoX, GPT-J) the MLP of a layer reads the block's input, so it has no edges from the
heads of its own layer.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actstore.model.adapter import ModelAdapter
from queries.attribution.graph import Graph
from queries.core.engine import Engine


@dataclass
class EdgeRun:
    """What one forward returns: final-position logits and the destination inputs.

    `inputs[i]` covers backward indices `EdgeModel.input_slices()[i]`, shape (batch, pos, n,
    d_model): per layer the heads' q, k, v inputs (3·n_heads), then the MLP input (1); last the
    logits input.
    """

    logits: torch.Tensor
    inputs: list[torch.Tensor]


class EdgeModel:
    """The engine of a model, and forwards over its edge graph (see the module docstring)."""

    def __init__(self, adapter: ModelAdapter, engine: Engine | None = None):
        self.adapter = adapter
        self.shape = adapter.shape
        self.engine = engine or Engine.from_adapter(adapter)
        self.graph = Graph.of(adapter.architecture)

    def head_outputs(self, z: torch.Tensor, layer: int) -> torch.Tensor:
        """Per-head outputs: (batch, pos, head, d_head) -> (batch, pos, head, d_model)."""
        return self.engine.head_outputs(layer, z)[0]

    def attention(self, x: torch.Tensor, layer: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Heads' outputs from per-head q, k, v inputs x (batch, pos, 3·heads, d_model), and the
        part of the attention's contribution that no head owns."""
        return self.engine.head_outputs(layer, self.engine.head_inputs_z(layer, x))

    def final_logits(self, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Logits at each prompt's final position from the logits input (batch, pos, d_model)."""
        rows = torch.arange(x.shape[0], device=x.device)
        return self.engine.unembed(x[rows, last])

    def input_slices(self) -> list[slice]:
        """Backward index ranges of the destination inputs, in the order `run` returns them."""
        g = self.graph
        h = self.shape.n_heads
        out = []
        for layer in range(self.shape.n_layers):
            start = g.layer_start(layer)
            out += [slice(start, start + 3 * h), slice(start + 3 * h, start + 3 * h + 1)]
        return out + [slice(g.n_backward - 1, g.n_backward)]

    def run(
        self,
        inputs: torch.Tensor,
        last: torch.Tensor,
        corrupted: torch.Tensor | None = None,
        dropped: torch.Tensor | None = None,
        replace: dict[int, torch.Tensor] | None = None,
    ) -> EdgeRun:
        """One forward from the input node's output `inputs` (batch, pos, d_model).

        `dropped` (n_forward, n_backward, float 0/1) marks edges that carry `corrupted` source
        outputs (batch, pos, n_forward, d_model) instead of this run's. `replace` maps a forward
        index range's first index (a layer's head 0 or an MLP) to outputs used instead of the
        computed ones (integrated gradients over activations).
        """
        g = self.graph
        h = self.shape.n_heads
        replace = replace or {}
        outs: list[torch.Tensor] = [inputs[:, :, None]]
        resid = inputs
        dst_inputs: list[torch.Tensor] = []

        def dst_input(cols: slice, n_up: int) -> torch.Tensor:
            x = resid[:, :, None].expand(-1, -1, cols.stop - cols.start, -1)
            if dropped is not None:
                d = dropped[:n_up, cols]
                if bool(d.any()):
                    delta = corrupted[:, :, :n_up] - torch.cat(outs, dim=2)
                    x = x + torch.einsum("bpsd,sn->bpnd", delta, d)
            dst_inputs.append(x)
            return x

        for layer in range(self.shape.n_layers):
            start = g.layer_start(layer)
            mlp_col = slice(start + 3 * h, start + 3 * h + 1)
            x = dst_input(slice(start, start + 3 * h), g.head_index(layer, 0))
            heads, rest = replace.get(g.head_index(layer, 0)), self.engine.head_rest(layer)
            if heads is None:
                heads, rest = self.attention(x, layer)
            if g.parallel:
                x_mlp = dst_input(mlp_col, int(g.n_upstream[mlp_col.start]))
            outs.append(heads)
            resid = resid + heads.sum(2) + (0.0 if rest is None else rest)
            if not g.parallel:
                x_mlp = dst_input(mlp_col, int(g.n_upstream[mlp_col.start]))
            mlp = replace.get(g.mlp_index(layer))
            if mlp is None:
                mlp = self.engine.mlp(layer, x_mlp[:, :, 0])
            outs.append(mlp[:, :, None])
            resid = resid + mlp
        x = dst_input(slice(g.n_backward - 1, g.n_backward), g.n_forward)
        return EdgeRun(self.final_logits(x[:, :, 0], last), dst_inputs)
