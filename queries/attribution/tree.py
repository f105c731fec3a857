"""Tree patching, fast and exact: the final logits of a run where every edge outside a circuit
carries its corrupted source output (`EdgeModel.run` with `dropped`, computed with less work).

The dense forward builds every destination's input from every upstream output. Here, for a
prompt batch and a kept-edge mask K, every node first gets a status from the mask alone:

- corrupted: each upstream edge is dropped or comes from a corrupted node, so the node reads the
  corrupted run's input and its output is the stored corrupted one; so is a node with no kept
  path to the logits, whose output no kept edge carries to anything that matters;
- clean: each upstream edge is kept and comes from a clean node, so its output is the stored
  clean one;
- computed: anything else, the only nodes whose outputs are computed.

Under a post-attention norm (Gemma 2) a head's share depends on every head of its layer, so a
layer's heads take one status together. With Δ_s = corrupted_s − out_s (zero for corrupted
nodes), a destination's input is

    input_d = corrupted_input_d − Σ_{s kept} Δ_s = corrupted_input_d − T + Σ_{s dropped} Δ_s

(T the running Σ Δ_s), mixed from whichever side has fewer non-zero Δ, as one matrix product over
the Δ rows it needs. A circuit of 10 edges computes a few nodes; the whole graph computes none.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from queries.attribution.edge_model import EdgeModel

CORRUPTED, CLEAN, COMPUTED = 0, 1, 2
# A destination group's Δ terms are gathered and added one by one when they number fewer than
# (Δ rows spanned × columns) / GATHER_COST, else mixed by one dense product over the span: a
# gathered term costs a few passes over a Δ row, the product 2 flops per element per column.
GATHER_COST = 72


@dataclass
class TreeBatch:
    """One prompt batch laid out for tree patching; shared by every circuit measured on it.

    Positions before `start` hold the same values in the clean and the corrupted run (every
    node's output there is equal in both, so in every circuit too: attention is causal); only
    positions from `start` on are computed, their attention reading the prefix's keys and
    values (AutoCircuit's tail divergence, found per batch from the data, so exact always).
    """

    start: int  # first position computed
    last: torch.Tensor  # (batch,) final positions, counted from `start`
    delta_clean: torch.Tensor  # (n_forward, batch, pos, d_model): corrupted − clean outputs
    corrupted: torch.Tensor  # (n_forward, batch, pos, d_model) corrupted outputs
    corrupted_in: dict[int, torch.Tensor]  # n upstream -> corrupted run's input of such nodes
    prefix: list[tuple[torch.Tensor, torch.Tensor]] | None  # per layer: keys, values per head

    @property
    def nbytes(self) -> int:
        """Memory the batch holds (each tensor's storage once)."""
        tensors = [self.last, self.delta_clean, self.corrupted, *self.corrupted_in.values()]
        for keys, values in self.prefix or []:
            tensors += [keys, values]
        storages = {t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in tensors}
        return sum(storages.values())


class TreePatcher:
    """Exact tree-patched logits of circuits over an `EdgeModel` (see the module docstring)."""

    def __init__(self, model: EdgeModel):
        self.model = model
        self.engine = model.engine
        g = self.graph = model.graph
        H = g.n_heads
        self.post_norm = [self.engine.layers[i].ln1_post is not None for i in range(g.n_layers)]
        self.units: list[list[int]] = []  # forward indices in order, taking one status each
        self.columns: dict[int, list[int]] = {}  # forward index -> its backward (input) columns
        for layer in range(g.n_layers):
            start = g.layer_start(layer)
            heads = [g.head_index(layer, h) for h in range(H)]
            for h, node in enumerate(heads):
                self.columns[node] = [start + h, start + H + h, start + 2 * H + h]
            self.units += [heads] if self.post_norm[layer] else [[n] for n in heads]
            self.columns[g.mlp_index(layer)] = [start + 3 * H]
            self.units.append([g.mlp_index(layer)])

    def batch(self, clean: torch.Tensor, corrupted: torch.Tensor, last: torch.Tensor) -> TreeBatch:
        """From node outputs (batch, pos, n_forward, d_model) of both runs (`EdgeBatch`)."""
        g, eng = self.graph, self.engine
        corr = corrupted.permute(2, 0, 1, 3)
        delta = corr - clean.permute(2, 0, 1, 3)
        changed = torch.nonzero(delta.abs().amax(dim=(0, 1, 3)) > 0)
        first = int(changed[0, 0]) if len(changed) else delta.shape[2]
        start = min(first, int(last.min()))
        resid = corr[0]
        points = {g.head_index(0, 0): resid}
        for layer in range(g.n_layers):
            h0 = g.head_index(layer, 0)
            rest = eng.head_rest(layer)
            resid = resid + corr[h0 : h0 + g.n_heads].sum(0) + (0.0 if rest is None else rest)
            if not g.parallel:
                points[g.mlp_index(layer)] = resid
            resid = resid + corr[g.mlp_index(layer)]
            points[g.head_index(layer + 1, 0)] = resid  # n_forward after the last layer
        prefix = None
        if start > 0:
            prefix = [eng.query_head_kv(layer, points[g.head_index(layer, 0)][:, :start])
                      for layer in range(g.n_layers)]  # fmt: skip
        return TreeBatch(
            start=start,
            last=last - start,
            delta_clean=delta[:, :, start:].contiguous(),
            corrupted=corr[:, :, start:].contiguous(),  # not views: the prefix's rows go
            corrupted_in={n: x[:, start:].contiguous() for n, x in points.items()},
            prefix=prefix,
        )

    def statuses(self, kept: np.ndarray) -> np.ndarray:
        """Every forward node's status (CORRUPTED, CLEAN, COMPUTED) under kept-edge mask `kept`."""
        g = self.graph
        kept = kept & g.real
        live = np.zeros(g.n_backward, dtype=bool)
        live[-1] = True  # the logits
        alive = np.zeros(g.n_forward, dtype=bool)
        for unit in reversed(self.units):
            if kept[unit][:, live].any():
                alive[unit] = True
                live[[c for n in unit for c in self.columns[n]]] = True
        status = np.full(g.n_forward, CORRUPTED, dtype=np.int8)
        status[0] = CLEAN  # the input node carries the clean embedding
        for unit in self.units:
            if not alive[unit[0]]:
                continue
            cols = [c for n in unit for c in self.columns[n]]
            n_up = int(g.n_upstream[cols[0]])
            k, up = kept[:n_up, cols], status[:n_up, None]
            if not (k & (up != CORRUPTED)).any():
                continue
            status[unit] = CLEAN if (k & (up == CLEAN)).all() else COMPUTED
        return status

    def logits(self, tb: TreeBatch, kept: np.ndarray) -> torch.Tensor:
        """Final-position logits (batch, vocab) of the circuit `kept` (n_forward, n_backward)."""
        return self.logits_many(tb, [kept])[0]

    def logits_many(self, tb: TreeBatch, masks: list[np.ndarray]) -> list[torch.Tensor]:
        """Final-position logits (batch, vocab) of each circuit in `masks`, the circuits side by
        side along the batch axis: a node that several circuits compute is one forward over
        their rows (each circuit's numbers are those it gets alone)."""
        g, eng = self.graph, self.engine
        H, C = g.n_heads, len(masks)
        kept = np.stack([mask & g.real for mask in masks])  # (C, n_forward, n_backward)
        status = np.stack([self.statuses(k) for k in kept])  # (C, n_forward)
        nonzero = status != CORRUPTED
        # (C, n_forward, batch, pos, d_model); rows of computed nodes are overwritten as they come
        delta = tb.delta_clean.unsqueeze(0).repeat(C, *[1] * tb.delta_clean.dim())
        total = delta[:, 0].clone()  # T per circuit: the input node's Δ so far
        B = tb.corrupted.shape[1]
        dev = total.device
        everyone = np.arange(C)

        def inputs(cols: list[int], cs: np.ndarray, positions: tuple | None = None) -> torch.Tensor:
            """Inputs (len(cs), …, len(cols), d_model) of destination columns in circuits `cs`,
            at all positions or at `positions` (index tuple into (batch, pos))."""
            n_up = int(g.n_upstream[cols[0]])
            whole = len(cs) == C
            k = kept[cs][:, :n_up, cols]
            nz = nonzero[cs][:, :n_up, None]
            n_kept = (k & nz).sum(1)
            by_kept = n_kept * 2 <= nz.sum(1)  # mix from the kept side where it is smaller
            coef = np.where(by_kept[:, None, :], -1.0 * (k & nz), 1.0 * (~k & nz))
            base = tb.corrupted_in[n_up]
            if positions is not None:
                base = base[positions]
            rows = np.nonzero(coef.any((0, 2)))[0]
            lo, hi = (int(rows[0]), int(rows[-1]) + 1) if len(rows) else (0, 0)
            term_c, src_rows, dst_cols = np.nonzero(coef)
            if GATHER_COST * len(src_rows) < len(cs) * (hi - lo) * len(cols):  # few terms
                tot = total if whole else total[torch.as_tensor(cs, device=dev)]
                if positions is not None:
                    tot = tot[(slice(None), *positions)]
                by_dropped = torch.as_tensor(~by_kept, dtype=base.dtype, device=dev)
                shape = (len(cs), *[1] * (tot.dim() - 2), len(cols), 1)
                x = base.unsqueeze(-2) - by_dropped.view(shape) * tot.unsqueeze(-2)
                flat = delta.view(C * g.n_forward, *delta.shape[2:])
                src = flat[torch.as_tensor(cs[term_c] * g.n_forward + src_rows, device=dev)]
                if positions is not None:
                    src = src[(slice(None), *positions)]
                sign = torch.as_tensor(
                    coef[term_c, src_rows, dst_cols], dtype=src.dtype, device=dev
                )
                terms = src * sign.view(-1, *[1] * (src.dim() - 1))
                mixed = src.new_zeros((len(cs) * len(cols), *src.shape[1:]))
                at = torch.as_tensor(term_c * len(cols) + dst_cols, device=dev)
                mixed.index_add_(0, at, terms)
                mixed = mixed.view(len(cs), len(cols), *src.shape[1:])
                return x + mixed.movedim(1, -2)
            # One product over a span of Δ rows costs the same whatever its coefficients: mix
            # from the kept side alone, so that T and its broadcasts drop out.
            coef = -1.0 * (k & nz)
            rows = np.nonzero(coef.any((0, 2)))[0]
            x = base.unsqueeze(-2)
            if len(rows) == 0:
                return x.expand(len(cs), *x.shape[:-2], len(cols), x.shape[-1])
            lo, hi = int(rows[0]), int(rows[-1]) + 1
            src = delta[:, lo:hi] if whole else delta[torch.as_tensor(cs, device=dev), lo:hi]
            if positions is not None:
                src = src[(slice(None), slice(None), *positions)]
            weights = torch.as_tensor(coef[:, lo:hi].transpose(0, 2, 1), dtype=src.dtype,
                                      device=dev)  # fmt: skip
            mixed = torch.bmm(weights, src.reshape(len(cs), hi - lo, -1))
            return x + mixed.view(len(cs), len(cols), *src.shape[2:]).movedim(1, -2)

        def settle(nodes: list[int], cs: np.ndarray, out: torch.Tensor | None) -> None:
            """Record the outputs (len(cs), …, len(nodes), d_model) computed for circuits `cs`
            where those circuits compute them, and add each circuit's Δ of `nodes` to its T."""
            if out is not None:
                out = out.movedim(-2, 1)  # (len(cs), len(nodes), …)
                ci, ni = np.nonzero(status[cs][:, nodes] == COMPUTED)
                a, b = nodes[0], nodes[-1] + 1
                if len(ci) == len(cs) * len(nodes) and b - a == len(nodes) and len(cs) == C:
                    torch.sub(tb.corrupted[a:b], out, out=delta[:, a:b])  # every row: no gather
                else:
                    idx = torch.as_tensor(np.asarray(nodes)[ni], device=dev)
                    rows = torch.as_tensor(cs[ci], device=dev)
                    delta[rows, idx] = tb.corrupted[idx] - out[ci, ni]
            for c in range(C):
                live = [n for n in nodes if nonzero[c, n]]
                if live and live[-1] + 1 - live[0] == len(live):  # a range: summed in place
                    total[c] += delta[c, live[0] : live[-1] + 1].sum(0)
                elif live:
                    total[c] += delta[c, live].sum(0)

        for layer in range(g.n_layers):
            heads = [g.head_index(layer, h) for h in range(H)]
            mlp = g.mlp_index(layer)
            computing = status[:, heads] == COMPUTED  # (C, heads)
            todo = [i for i in range(H) if computing[:, i].any()]
            cs = np.nonzero(computing.any(1))[0]
            out = None
            if todo:
                cols = [c for i in todo for c in self.columns[heads[i]]]
                order = [c for part in range(3) for c in cols[part::3]]  # q…, k…, v…
                subset = None if self.post_norm[layer] else torch.as_tensor(todo, device=dev)
                prefix = None if tb.prefix is None else tb.prefix[layer]
                if prefix is not None and subset is not None:
                    prefix = (prefix[0][:, :, subset], prefix[1][:, :, subset])
                if prefix is not None and len(cs) > 1:
                    prefix = (
                        prefix[0].repeat(len(cs), 1, 1, 1),
                        prefix[1].repeat(len(cs), 1, 1, 1),
                    )
                x = inputs(order, cs)
                z = eng.head_inputs_z(layer, x.flatten(0, 1), subset, tb.start, prefix)
                out = eng.head_outputs(layer, z, subset)[0]
                out = out.view(len(cs), B, *out.shape[1:])
            mlp_cs = np.nonzero(status[:, mlp] == COMPUTED)[0]
            mlp_done = None
            if g.parallel and len(mlp_cs):
                x = inputs(self.columns[mlp], mlp_cs)[..., 0, :]
                mlp_done = eng.mlp(layer, x.flatten(0, 1)).view(x.shape)
            settle([heads[i] for i in todo], cs, out)
            settle([n for i, n in enumerate(heads) if i not in todo], everyone, None)
            if not g.parallel and len(mlp_cs):
                x = inputs(self.columns[mlp], mlp_cs)[..., 0, :]
                mlp_done = eng.mlp(layer, x.flatten(0, 1)).view(x.shape)
            settle([mlp], mlp_cs, None if mlp_done is None else mlp_done.unsqueeze(-2))
        rows = (torch.arange(B, device=dev), tb.last)
        final = inputs([g.n_backward - 1], everyone, rows)[:, :, 0]  # (C, batch, d_model)
        return list(eng.unembed(final.flatten(0, 1)).view(C, B, -1).unbind(0))
