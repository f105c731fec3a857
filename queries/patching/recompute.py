"""Downstream-only recompute of many patched variants at once, from cached activations.

A group is a set of variants that patch one component at one position `pos` (or at every
position, `pos=None`), each at its own layers. Every variant starts where its first patch is:
- resid_pre at L: the cached base resid_pre of L with the source's value at `pos`;
- a head's or the attention's output at L: the attention's residual contribution changes by Δ at
  the patched positions (Δ = (src − base)·W_O for a head, through the post-attention norm where
  the family has one; src − base for the attention output), so resid_mid of L is the cached base
  resid_mid plus Δ and the MLP of L runs only at those positions; under parallel attention and
  MLP the MLP does not read the attention, and resid_pre of L+1 is the cached one plus Δ;
- mlp_out at L: the cached base resid_pre of L+1 plus (src − base) at `pos`.
Positions before `start` are untouched by a patch at `pos ≥ start` (causal attention), so each
layer attends over the base run's keys/values there (from the cached resid_pre → ln1 → K, V at
their absolute positions) and recomputes only positions ≥ start. The last layer computes its
query, attention output and MLP at each prompt's final position only. Variants join the batch at
their first layer, so every layer runs all variants that have started as one batch ("staggered"
batching). A variant patching a window of layers keeps patching as it passes the later layers.
The transformer's math is the engine's (queries/core/engine.py); this module only schedules it.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from queries.core.engine import Engine
from queries.patching.batch import Batch


@dataclass(frozen=True)
class Variant:
    """One patched run: the layers it patches (first = where recompute starts) and the head."""

    layers: tuple[int, ...]
    head: int | None = None


@dataclass
class Group:
    """Variants sharing a component and a patched position (None = all positions)."""

    component: str  # head | resid | attn-out | mlp-out
    pos: int | None
    start: int  # first recomputed position: pos with KV reuse, 0 for a full-length suffix
    variants: list[Variant]
    role: str | None = None  # patched by role: placed at each prompt's position per batch


class PrefixKV:
    """Base-run keys and values of every layer for one batch, computed once, sliced per group."""

    def __init__(self, engine: Engine, batch: Batch):
        self.engine, self.batch = engine, batch
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, layer: int, start: int) -> tuple[torch.Tensor, torch.Tensor] | None:
        if start == 0:
            return None
        if layer not in self.cache:
            e, pre = self.engine, self.batch.base["resid_pre"][layer]
            pos = torch.arange(pre.shape[1], device=pre.device)
            self.cache[layer] = e.kv(layer, e.ln1(layer, pre), pos)
        keys, values = self.cache[layer]
        return keys[:, :start], values[:, :start]


def final_resid(e: Engine, batch: Batch, g: Group, prefix: PrefixKV) -> torch.Tensor:
    """The residual stream after the last block at each prompt's final position, for every
    variant of the group: (n_variants, B, d_model)."""
    n, B, s0 = e.n_layers, batch.size, g.start
    base, src = batch.base, batch.src
    idx = slice(None) if g.pos is None else slice(g.pos - s0, g.pos - s0 + 1)
    joins: dict[int, list[int]] = defaultdict(list)
    for vi, v in enumerate(g.variants):
        joins[v.layers[0]].append(vi)
    out = torch.empty(
        len(g.variants), B, base["resid_pre"][n].shape[-1], device=batch.finals.device
    )
    pending: dict[int, list[tuple[list[int], torch.Tensor]]] = defaultdict(list)
    x: torch.Tensor | None = None  # (rows, B, T, d_model): the variants started so far
    order: list[int] = []  # variant of each row

    def patched_here(layer: int) -> list[tuple[int, Variant]]:
        return [(r, g.variants[vi]) for r, vi in enumerate(order)
                if layer in g.variants[vi].layers[1:]]  # fmt: skip

    for layer in range(min(joins), n):
        if g.component == "resid":
            for vi in joins[layer]:
                t = base["resid_pre"][layer][:, s0:].clone()
                t[:, idx] = src["resid_pre"][layer][:, s0:][:, idx]
                pending[layer].append(([vi], t.unsqueeze(0)))
        for ids, t in pending.pop(layer, []):
            x = t if x is None else torch.cat([x, t])
            order.extend(ids)
        if g.component == "resid" and x is not None:
            for r, _ in patched_here(layer):
                x[r][:, idx] = src["resid_pre"][layer][:, s0:][:, idx]
        if layer == n - 1:
            _last_layer(e, batch, g, x, order, joins[layer], prefix, out)
            break
        if x is not None:
            x = _block(e, batch, g, layer, x, idx, patched_here(layer), prefix)
        if g.component != "resid" and joins[layer]:
            pending[layer + 1].append((joins[layer], _join_after(e, batch, g, layer, idx)))
    if g.pos is not None and s0 > 0:
        before = batch.finals < s0  # final position precedes every recomputed position
        if before.any():
            out[:, before] = _at_final(base["resid_pre"][n], batch.finals)[before]
    return out


def _sublayers(
    e: Engine,
    batch: Batch,
    g: Group,
    layer: int,
    x: torch.Tensor,
    z: torch.Tensor,
    rows: list[tuple[int, Variant]],
    where: tuple,
    covered: tuple,
) -> torch.Tensor:
    """The block's output from its input x (n, B, …, D) and the heads' z, with the window
    patches of `rows` (row, variant) applied: `where` indexes the source's (B, seq, …)
    activations, `covered` the patched entries of each row."""
    src = batch.src
    if g.component == "head" and rows:
        src_z = src["z"][layer][where]
        for r, v in rows:
            at = (*covered, ..., v.head, slice(None))
            z[r][at] = src_z[at]
    attn = e.attn_residual(layer, e.attn_out(layer, z))
    if g.component == "attn-out" and rows:
        src_attn = src.attn(layer)[where]
        for r, _ in rows:
            attn[r][covered] = src_attn[covered]
    mid = x + attn
    mlp = e.mlp(layer, x if e.arch.parallel else mid)
    if g.component == "mlp-out" and rows:
        src_mlp = src["mlp_out"][layer][where]
        for r, _ in rows:
            mlp[r][covered] = src_mlp[covered]
    return mid + mlp


def _block(
    e: Engine,
    batch: Batch,
    g: Group,
    layer: int,
    x: torch.Tensor,
    idx: slice,
    patched: list[tuple[int, Variant]],
    prefix: PrefixKV,
) -> torch.Tensor:
    """One block over the suffix positions of every started variant, window patches applied."""
    s0, T = g.start, x.shape[2]
    normed = e.ln1(layer, x)
    pos = torch.arange(s0, s0 + T, device=x.device)
    keys, values = e.kv(layer, normed, pos)
    q_pos = pos.expand(x.shape[1], T)
    z = e.attend(layer, e.q(layer, normed, pos), keys, values, q_pos, s0, prefix.get(layer, s0))
    where = (slice(None), slice(s0, None))
    return _sublayers(e, batch, g, layer, x, z, patched, where, (slice(None), idx))


def _attn_delta(e: Engine, batch: Batch, g: Group, layer: int, ids: list[int], sel: tuple):
    """How the attention's residual contribution changes at positions `sel` when each variant
    of `ids` patches its head (or the whole output): (n, B, …, d_model)."""
    base, src = batch.base, batch.src
    if g.component == "attn-out":
        return (src.attn(layer) - base.attn(layer))[sel].unsqueeze(0)
    heads = [g.variants[vi].head for vi in ids]
    dz = (src["z"][layer] - base["z"][layer])[sel][..., heads, :]  # (B, …, m, d_head)
    w = e.weights.layers[layer].W_O[heads]  # (m, d_head, d_model)
    e.flops += 2.0 * dz.numel() * w.shape[-1]
    delta = torch.einsum("b...md,mdD->mb...D", dz, w)
    if e.layers[layer].ln1_post is None:
        return delta
    out = e.attn_out(layer, base["z"][layer][sel])  # the base output before the post-norm
    return e.attn_residual(layer, out + delta) - base.attn(layer)[sel]


def _after_attn(e: Engine, batch: Batch, layer: int, sel: tuple, delta: torch.Tensor):
    """resid_pre of layer+1 at `sel` when the attention's contribution changes by `delta`."""
    base = batch.base
    if e.arch.parallel:  # the MLP read the block's input, not the attention's output
        return base["resid_pre"][layer + 1][sel] + delta
    mid = base["resid_mid"][layer][sel] + delta
    return mid + e.mlp(layer, mid)


def _join_after(e: Engine, batch: Batch, g: Group, layer: int, idx: slice) -> torch.Tensor:
    """resid_pre of layer+1 for the variants that start at `layer` by patching an output."""
    base, src, s0 = batch.base, batch.src, g.start
    ids = [vi for vi, v in enumerate(g.variants) if v.layers[0] == layer]
    nxt = base["resid_pre"][layer + 1][:, s0:]
    if g.component == "mlp-out":
        t = nxt.clone()
        t[:, idx] += (src["mlp_out"][layer] - base["mlp_out"][layer])[:, s0:][:, idx]
        return t.unsqueeze(0)
    sel = (slice(None), slice(s0, None) if g.pos is None else slice(g.pos, g.pos + 1))
    changed = _after_attn(e, batch, layer, sel, _attn_delta(e, batch, g, layer, ids, sel))
    if g.pos is None:
        return changed
    t = nxt.expand(len(ids), *nxt.shape).clone()
    t[:, :, idx] = changed
    return t


def _at_final(act: torch.Tensor, finals: torch.Tensor) -> torch.Tensor:
    """act (…, B, seq, d) at each prompt's final position → (…, B, d)."""
    rows = torch.arange(finals.shape[0], device=finals.device)
    return act[..., rows, finals, :]


def _last_layer(
    e: Engine,
    batch: Batch,
    g: Group,
    x: torch.Tensor | None,
    order: list[int],
    joining: list[int],
    prefix: PrefixKV,
    out: torch.Tensor,
) -> None:
    """The last block at the final positions only; writes every variant's result into `out`."""
    base, src, s0 = batch.base, batch.src, g.start
    layer = e.n_layers - 1
    fin = batch.finals
    covered = torch.ones_like(fin, dtype=torch.bool) if g.pos is None else fin == g.pos
    if x is not None:
        T = x.shape[2]
        qi = (fin - s0).clamp(0, T - 1)
        normed = e.ln1(layer, x)
        keys, values = e.kv(layer, normed, torch.arange(s0, s0 + T, device=x.device))
        q_pos = (s0 + qi).unsqueeze(1)
        q = e.q(layer, _at_final(normed, qi).unsqueeze(2), q_pos)
        z = e.attend(layer, q, keys, values, q_pos, s0, prefix.get(layer, s0)).squeeze(2)
        rows = [(r, g.variants[vi]) for r, vi in enumerate(order)
                if layer in g.variants[vi].layers[1:]]  # fmt: skip
        where = (torch.arange(fin.shape[0], device=fin.device), fin)
        xf = _at_final(x, qi)
        out[order] = _sublayers(e, batch, g, layer, xf, z, rows, where, (covered,))
    if not joining or g.component == "resid":
        return

    def masked(delta: torch.Tensor) -> torch.Tensor:  # 0 where the final position is unpatched
        return torch.where(covered.unsqueeze(-1), delta, 0.0)  # (the source there may be unread)

    if g.component == "mlp-out":
        delta = _at_final(src["mlp_out"][layer] - base["mlp_out"][layer], fin)
        out[joining] = (_at_final(base["resid_pre"][layer + 1], fin) + masked(delta)).unsqueeze(0)
        return
    where = (torch.arange(fin.shape[0], device=fin.device), fin)
    delta = _attn_delta(e, batch, g, layer, joining, where)  # (m, B, d_model)
    out[joining] = _after_attn(e, batch, layer, where, masked(delta))
