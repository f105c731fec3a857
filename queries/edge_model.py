"""An edge-patchable forward pass: GPT-2 block math where each node's input is a sum of outputs.

The residual stream entering a node is the input embedding plus every upstream node's output
plus the attention output biases b_O of the layers passed (b_O belongs to no head: it is the
same in every run, so it cancels in every clean-vs-corrupted difference and its split among
heads would change no score and no faithfulness). A head's output is z·W_O[h], an MLP's is
mlp_out, the input node's is the embedding (resid_pre of block 0).

Patching edges: for a destination d and a kept-edge mask K (n_forward, n_backward),

    input_d = Σ_s out_s(this run) + biases + Σ_{s: K[s,d] = 0} (corrupted_s − out_s(this run))

so an edge in the circuit carries its source's value in this run, an edge outside carries the
corrupted run's value, exactly as in Hanna et al.'s evaluation. With every edge kept this is the
model's ordinary forward; with none kept it is the corrupted run.

Weights are read once from the bridge (TransformerLens layout, not folded) and detached.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from actstore.errors import ActstoreError
from actstore.models import ModelAdapter
from queries.graph import Graph
from queries.kernels import ACTIVATIONS


@dataclass
class _Layer:
    ln1: tuple[torch.Tensor, torch.Tensor, float]
    ln2: tuple[torch.Tensor, torch.Tensor, float]
    W_Q: torch.Tensor
    W_K: torch.Tensor
    W_V: torch.Tensor
    W_O: torch.Tensor
    b_Q: torch.Tensor
    b_K: torch.Tensor
    b_V: torch.Tensor
    b_O: torch.Tensor
    W_in: torch.Tensor
    b_in: torch.Tensor
    W_out: torch.Tensor
    b_out: torch.Tensor


@dataclass
class EdgeRun:
    """What one forward returns: final-position logits and the destination inputs.

    `inputs[i]` covers backward indices `EdgeModel.input_slices()[i]`, shape (batch, pos, n,
    d_model): per layer the heads' q, k, v inputs (3·n_heads), then the MLP input (1); last the
    logits input.
    """

    logits: torch.Tensor
    inputs: list[torch.Tensor]


def _ln(x: torch.Tensor, params: tuple[torch.Tensor, torch.Tensor, float]) -> torch.Tensor:
    w, b, eps = params
    return F.layer_norm(x, (x.shape[-1],), w, b, eps)


def _ln_params(module) -> tuple[torch.Tensor, torch.Tensor, float]:
    inner = getattr(module, "original_component", module)
    return inner.weight.detach(), inner.bias.detach(), float(inner.eps)


class EdgeModel:
    """The model's weights, and forwards over the edge graph (see the module docstring)."""

    def __init__(self, adapter: ModelAdapter):
        b = adapter.bridge
        cfg = b.cfg
        if getattr(cfg, "normalization_type", "LN") not in ("LN", "LNPre", None):
            raise ActstoreError(
                f"model {adapter.spec!r}: edge attribution supports LayerNorm models (GPT-2 "
                f"family), not {cfg.normalization_type}"
            )
        if getattr(cfg, "parallel_attn_mlp", False) or cfg.act_fn not in ACTIVATIONS:
            raise ActstoreError(
                f"model {adapter.spec!r}: edge attribution supports sequential GPT-2-style "
                f"blocks with {', '.join(ACTIVATIONS)} MLPs"
            )
        self.adapter = adapter
        self.shape = adapter.shape
        self.graph = Graph.from_config(adapter.shape)
        self.act = ACTIVATIONS[cfg.act_fn]
        scale = getattr(cfg, "attn_scale", -1.0)
        self.attn_scale = float(scale) if scale and scale > 0 else math.sqrt(self.shape.d_head)
        self.layers: list[_Layer] = []
        for block in b.blocks:
            a, m = block.attn, block.mlp
            self.layers.append(
                _Layer(
                    ln1=_ln_params(block.ln1),
                    ln2=_ln_params(block.ln2),
                    W_Q=a.W_Q.detach(),
                    W_K=a.W_K.detach(),
                    W_V=a.W_V.detach(),
                    W_O=a.W_O.detach(),
                    b_Q=a.b_Q.detach(),
                    b_K=a.b_K.detach(),
                    b_V=a.b_V.detach(),
                    b_O=a.b_O.detach(),
                    W_in=m.W_in.detach(),
                    b_in=m.b_in.detach(),
                    W_out=m.W_out.detach(),
                    b_out=m.b_out.detach(),
                )  # fmt: skip
            )
        self.ln_final = _ln_params(b.ln_final)
        self.W_U = b.W_U.detach()
        self.b_U = b.b_U.detach()

    def head_outputs(self, z: torch.Tensor, layer: int) -> torch.Tensor:
        """Per-head outputs z·W_O[h]: (batch, pos, head, d_head) -> (batch, pos, head, d_model)."""
        return torch.einsum("bphe,hed->bphd", z, self.layers[layer].W_O)

    def attention(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        """Heads' outputs from per-head q, k, v inputs x (batch, pos, 3·heads, d_model)."""
        p = self.layers[layer]
        h = self.shape.n_heads
        normed = _ln(x, p.ln1)
        q = torch.einsum("bphd,hde->bphe", normed[:, :, :h], p.W_Q) + p.b_Q
        k = torch.einsum("bphd,hde->bphe", normed[:, :, h : 2 * h], p.W_K) + p.b_K
        v = torch.einsum("bphd,hde->bphe", normed[:, :, 2 * h :], p.W_V) + p.b_V
        scores = torch.einsum("bqhe,bkhe->bhqk", q, k) / self.attn_scale
        n = x.shape[1]
        causal = torch.ones(n, n, dtype=torch.bool, device=x.device).tril()
        scores = scores.masked_fill(~causal, float("-inf"))
        z = torch.einsum("bhqk,bkhe->bqhe", scores.softmax(-1), v)
        return self.head_outputs(z, layer)

    def mlp(self, x: torch.Tensor, layer: int) -> torch.Tensor:
        p = self.layers[layer]
        return self.act(_ln(x, p.ln2) @ p.W_in + p.b_in) @ p.W_out + p.b_out

    def final_logits(self, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
        """Logits at each prompt's final position from the logits input (batch, pos, d_model)."""
        rows = torch.arange(x.shape[0], device=x.device)
        return _ln(x[rows, last], self.ln_final) @ self.W_U + self.b_U

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
            x = dst_input(slice(start, start + 3 * h), g.head_index(layer, 0))
            heads = replace.get(g.head_index(layer, 0))
            if heads is None:
                heads = self.attention(x, layer)
            outs.append(heads)
            resid = resid + heads.sum(2) + self.layers[layer].b_O
            x = dst_input(slice(start + 3 * h, start + 3 * h + 1), g.mlp_index(layer))
            mlp = replace.get(g.mlp_index(layer))
            if mlp is None:
                mlp = self.mlp(x[:, :, 0], layer)
            outs.append(mlp[:, :, None])
            resid = resid + mlp
        x = dst_input(slice(g.n_backward - 1, g.n_backward), g.n_forward)
        return EdgeRun(self.final_logits(x[:, :, 0], last), dst_inputs)
