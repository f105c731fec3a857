"""Downstream-only recompute of many patched variants at once, from cached activations.

A group is a set of variants that patch one component at one position `pos` (or at every
position, `pos=None`), each at its own layers. Every variant starts where its first patch is:
- resid_pre at L: the cached base resid_pre of L with the source's value at `pos`;
- a head's or the attention's output at L: linear into resid_mid, so the cached base resid_mid of
  L plus (src − base)·W_O at the patched positions; the MLP of L runs only at those positions;
- mlp_out at L: the cached base resid_pre of L+1 plus (src − base) at `pos`.
Positions before `start` are untouched by a patch at `pos ≥ start` (causal attention), so each
layer attends over the base run's keys/values there (from the cached resid_pre → ln1 → K, V)
and recomputes only positions ≥ start. The last layer computes its query, attention output and
MLP at each prompt's final position only. Variants join the batch at their first layer, so
every layer runs all variants that have started as one batch ("staggered" batching). A variant
patching a window of layers keeps patching as it passes the later layers.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import torch

from queries.activations import Batch
from queries.kernels import Kernels


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


class PrefixKV:
    """Base-run keys and values of every layer for one batch, computed once, sliced per group."""

    def __init__(self, k: Kernels, batch: Batch):
        self.k, self.batch = k, batch
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, layer: int, start: int) -> tuple[torch.Tensor, torch.Tensor]:
        if start == 0:
            pre = self.batch.base["pre"][layer][:, :0]
            empty = pre.new_empty(*pre.shape[:2], self.k.n_heads, self.k.d_head)
            return empty, empty
        if layer not in self.cache:
            pre = self.batch.base["pre"][layer]
            self.cache[layer] = self.k.kv(layer, self.k.ln1(layer, pre))
        keys, values = self.cache[layer]
        return keys[:, :start], values[:, :start]


def final_resid(k: Kernels, batch: Batch, g: Group, prefix: PrefixKV) -> torch.Tensor:
    """The residual stream after the last block at each prompt's final position, for every
    variant of the group: (n_variants, B, d_model)."""
    n, B, s0 = k.n_layers, batch.size, g.start
    base, src = batch.base, batch.src
    idx = slice(None) if g.pos is None else slice(g.pos - s0, g.pos - s0 + 1)
    joins: dict[int, list[int]] = defaultdict(list)
    for vi, v in enumerate(g.variants):
        joins[v.layers[0]].append(vi)
    out = torch.empty(len(g.variants), B, base["pre"][n].shape[-1], device=batch.finals.device)
    pending: dict[int, list[tuple[list[int], torch.Tensor]]] = defaultdict(list)
    x: torch.Tensor | None = None  # (rows, B, T, d_model): the variants started so far
    order: list[int] = []  # variant of each row

    def patched_here(layer: int) -> list[tuple[int, Variant]]:
        return [(r, g.variants[vi]) for r, vi in enumerate(order)
                if layer in g.variants[vi].layers[1:]]  # fmt: skip

    for layer in range(min(joins), n):
        if g.component == "resid":
            for vi in joins[layer]:
                t = base["pre"][layer][:, s0:].clone()
                t[:, idx] = src["pre"][layer][:, s0:][:, idx]
                pending[layer].append(([vi], t.unsqueeze(0)))
        for ids, t in pending.pop(layer, []):
            x = t if x is None else torch.cat([x, t])
            order.extend(ids)
        if g.component == "resid" and x is not None:
            for r, _ in patched_here(layer):
                x[r][:, idx] = src["pre"][layer][:, s0:][:, idx]
        if layer == n - 1:
            _last_layer(k, batch, g, x, order, joins[layer], prefix, out)
            break
        if x is not None:
            x = _block(k, batch, g, layer, x, idx, patched_here(layer), prefix)
        if g.component != "resid" and joins[layer]:
            pending[layer + 1].append((joins[layer], _join_after(k, batch, g, layer, idx)))
    if g.pos is not None and s0 > 0:
        before = batch.finals < s0  # final position precedes every recomputed position
        if before.any():
            out[:, before] = _at_final(base["pre"][n], batch.finals)[before]
    return out


def _block(
    k: Kernels,
    batch: Batch,
    g: Group,
    layer: int,
    x: torch.Tensor,
    idx: slice,
    patched: list[tuple[int, Variant]],
    prefix: PrefixKV,
) -> torch.Tensor:
    """One block over the suffix positions of every started variant, window patches applied."""
    src, s0 = batch.src, g.start
    T = x.shape[2]
    normed = k.ln1(layer, x)
    keys, values = k.kv(layer, normed)
    k_pre, v_pre = prefix.get(layer, s0)
    q_pos = torch.arange(s0, s0 + T, device=x.device).expand(x.shape[1], T)
    z = k.attend(k.q(layer, normed), keys, values, k_pre, v_pre, q_pos, s0)
    if g.component == "head":
        for r, v in patched:
            z[r][:, idx, v.head] = src["z"][layer][:, s0:][:, idx, v.head]
    mid = x + k.attn_out(layer, z)
    if g.component == "attn-out":
        for r, _ in patched:
            mid[r][:, idx] = x[r][:, idx] + src.attn(layer)[:, s0:][:, idx]
    post = mid + k.mlp(layer, mid)
    if g.component == "mlp-out":
        for r, _ in patched:
            post[r][:, idx] = mid[r][:, idx] + src["mlp"][layer][:, s0:][:, idx]
    return post


def _mid_delta(k: Kernels, batch: Batch, g: Group, layer: int, ids: list[int], sel) -> torch.Tensor:
    """(src − base) of the patched output at positions `sel`, as it enters resid_mid: one row per
    variant (n, B, …, d_model)."""
    base, src = batch.base, batch.src
    if g.component == "head":
        heads = [g.variants[vi].head for vi in ids]
        dz = (src["z"][layer] - base["z"][layer])[sel][..., heads, :]  # (B, …, m, d_head)
        w = k.layers[layer].W_O[heads]  # (m, d_head, d_model)
        k.flops += 2.0 * dz.numel() * w.shape[-1]
        return torch.einsum("b...md,mdD->mb...D", dz, w)
    return (src.attn(layer) - base.attn(layer))[sel].unsqueeze(0)


def _join_after(k: Kernels, batch: Batch, g: Group, layer: int, idx: slice) -> torch.Tensor:
    """resid_pre of layer+1 for the variants that start at `layer` by patching an output."""
    base, src, s0 = batch.base, batch.src, g.start
    ids = [vi for vi, v in enumerate(g.variants) if v.layers[0] == layer]
    nxt = base["pre"][layer + 1][:, s0:]
    if g.component == "mlp-out":
        t = nxt.clone()
        t[:, idx] += (src["mlp"][layer] - base["mlp"][layer])[:, s0:][:, idx]
        return t.unsqueeze(0)
    sel = (slice(None), slice(s0, None) if g.pos is None else slice(g.pos, g.pos + 1))
    mid = base["mid"][layer][sel] + _mid_delta(k, batch, g, layer, ids, sel)
    changed = mid + k.mlp(layer, mid)
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
    k: Kernels,
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
    layer = k.n_layers - 1
    fin = batch.finals
    covered = torch.ones_like(fin, dtype=torch.bool) if g.pos is None else fin == g.pos
    if x is not None:
        T = x.shape[2]
        qi = (fin - s0).clamp(0, T - 1)
        normed = k.ln1(layer, x)
        keys, values = k.kv(layer, normed)
        k_pre, v_pre = prefix.get(layer, s0)
        q = k.q(layer, _at_final(normed, qi)).unsqueeze(2)
        z = k.attend(q, keys, values, k_pre, v_pre, (s0 + qi).unsqueeze(1), s0).squeeze(2)
        xf = _at_final(x, qi)
        rows = [(r, g.variants[vi]) for r, vi in enumerate(order)
                if layer in g.variants[vi].layers[1:]]  # fmt: skip
        if g.component == "head":
            src_z = _at_final(src["z"][layer].flatten(-2), fin).unflatten(-1, z.shape[-2:])
            for r, v in rows:
                z[r, covered, v.head] = src_z[covered, v.head]
        mid = xf + k.attn_out(layer, z)
        if g.component == "attn-out":
            src_attn = _at_final(src.attn(layer), fin)
            for r, _ in rows:
                mid[r, covered] = xf[r, covered] + src_attn[covered]
        post = mid + k.mlp(layer, mid)
        if g.component == "mlp-out":
            src_mlp = _at_final(src["mlp"][layer], fin)
            for r, _ in rows:
                post[r, covered] = mid[r, covered] + src_mlp[covered]
        out[order] = post
    if not joining or g.component == "resid":
        return
    mask = covered.to(out.dtype).unsqueeze(-1)
    if g.component == "mlp-out":
        delta = _at_final(src["mlp"][layer] - base["mlp"][layer], fin)
        out[joining] = (_at_final(base["pre"][layer + 1], fin) + mask * delta).unsqueeze(0)
        return
    rows_sel = (torch.arange(fin.shape[0], device=fin.device), fin)
    delta = _mid_delta(k, batch, g, layer, joining, rows_sel)  # (m, B, d_model)
    mid = _at_final(base["mid"][layer], fin) + mask * delta
    out[joining] = mid + k.mlp(layer, mid)
