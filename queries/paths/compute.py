"""Path patching on the engine: each (sender, receiver, role) a variant along the batch axis.

The base run (corrupted for denoising, clean for noising) and the source run are read from the
store. A sender's change Δ = its output in the source run − its output in the base run (a head's
output is its share of the attention's residual contribution, `Engine.head_outputs`, as in the
edge graph; an MLP's is mlp_out), restricted to the role's position when one is given.

A receiver reads the sender's change only by the direct path: its input is the base run's input
plus Δ, i.e. what it would read if every component between them kept its base value (Wang et
al.'s frozen run). Everything else computes freely from the first receiver's layer on, the
receivers' pinned inputs aside:
- a head's q, k or v input: ln1(base resid_pre + Δ) projected for that input; the head's other
  inputs read the running residual. Under grouped-query attention a query head's key and value
  are its key/value head's weights applied to its own input (the edge graph's per-query-head
  convention), so a k or v receiver changes that query head's key or value alone;
- an MLP's input: the base run's input to it + Δ;
- the logits: the base run's final residual + Δ (the sender's direct effect).
With one receiver this is one edge of the edge graph patched in the base run, which is what
TransformerLens' `get_act_patch_direct_path` measures. Variants that start at the same layer run
together, in chunks that bound memory; nothing before that layer is recomputed.

The fast recompute (`fast=False` is the plain one: every variant at every position of every
layer from its first receiver's, kept as the reference the shortcuts are tested against) skips
what cannot change, all of it exact:
- Positions before the first one where the span's clean and corrupted inputs differ (their
  tokens; under gaussian noising the noised embeddings the run stores): both runs compute the
  same values there at every layer, attention being causal, so every sender's Δ is zero. A
  sender restricted to a role (`--positions`) changes nothing before the span's earliest
  position of that role either. Variants recompute only the tail from there on; each layer's
  queries attend over the base run's keys and values of the prefix (ln1 of its stored residual,
  projected once per span and layer) and their own of the tail, at true positions. Positions
  after every prompt's final one are not computed at all.
- On the first receivers' layer every variant's residual is the base run's: its attention and
  MLP are computed once, and per variant only what the receivers change (their heads' pinned q,
  k or v, those heads' attention, and the MLP where it is a receiver). Where only heads changed
  (no post-attention norm, no MLP receiver), the MLP's input projections of each variant are the
  base's plus its heads' z through W_O·ln2·W_in (`Engine.mlp_of_heads`) where that multiplies
  less.
- On the last layer only each prompt's final position is read by the metric: keys and values at
  every position, queries, attention output and MLP at the final one.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from actstore.core.choices import SIDES
from actstore.model.derivable import INPUT_EMBEDS, TOKENS
from actstore.model.hooks import final_hook, hook_name
from actstore.model.metrics import from_resid
from queries.core.engine import Engine
from queries.core.reader import Reader, Span, sides
from queries.paths.spec import Node, Receiver

# The most activation elements (variants × prompts × positions × d_model) a chunk holds.
VARIANT_ELEMENTS = 1 << 24


def span_sums(
    e: Engine,
    reader: Reader,
    span: Span,
    pairs: Sequence[tuple[Node, Receiver]],
    roles: np.ndarray | None,
    metric: str,
    direction: str,
    fast: bool = True,
) -> np.ndarray:
    """Σ over the span's prompts of the metric of every (pair, role) variant: (n_pairs, n_roles);
    `roles` (n_prompts, n_roles) holds each prompt's position of each role (None: one column,
    every position). `fast=False` is the plain recompute (the module docstring)."""
    base, src = sides(direction)
    with torch.no_grad():
        t, last = reader.targets(span), reader.finals(span)
        delta = _deltas(e, reader, span, {s for s, _ in pairs}, base, src)
        B, T, D = next(iter(delta.values())).shape
        stop = int(last.max()) + 1 if fast else T
        if roles is None:
            masks = torch.ones(1, B, T, 1, device=last.device)
            firsts = [0]
        else:
            at = torch.as_tensor(roles[span.index], device=last.device)  # (B, n_roles)
            grid = torch.arange(T, device=last.device)
            masks = (grid[None, None, :] == at.T[:, :, None]).float()[..., None]
            firsts = at.min(0).values.tolist()
        if fast:  # every prompt's final position stays in the recomputed tail
            changed, lowest = _first_change(e, reader, span), int(last.min())
            firsts = [min(max(f, changed), lowest) for f in firsts]
        else:
            firsts = [0] * len(firsts)
        variants = [(i, r) for i in range(len(pairs)) for r in range(masks.shape[0])]
        groups: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
        for i, r in variants:
            start = min(_layer(m, e.n_layers) for m in pairs[i][1].members)
            groups[(start, firsts[r])].append((i, r))
        whole = {start for start, _ in groups}
        whole |= {_layer(m, e.n_layers) for _, r in pairs for m in r.members}
        state = _BaseRun(e, reader, span, base, last, stop, whole)
        out = np.zeros((len(pairs), masks.shape[0]))
        for (start, s0), chosen in sorted(groups.items()):
            step = max(1, VARIANT_ELEMENTS // (B * (stop - s0) * D))
            for lo in range(0, len(chosen), step):
                part = chosen[lo : lo + step]
                dl = torch.stack([delta[pairs[i][0]][:, s0:stop] * masks[r][:, s0:stop]
                                  for i, r in part])  # fmt: skip
                receivers = [pairs[i][1] for i, _ in part]
                values = _run(e, state, start, s0, receivers, dl, metric, t, fast)
                for (i, r), v in zip(part, values.sum(-1).tolist(), strict=True):
                    out[i, r] = v
    return out


def _first_change(e: Engine, reader: Reader, span: Span) -> int:
    """The first position where some prompt's clean and corrupted inputs differ (the span's
    length where none do), decided from the inputs: the tokens, and under gaussian noising
    the noised embeddings of layer 0 the run stores against the clean tokens' embeddings. 0
    where the run stores neither, or noises its inputs without storing them."""
    noised = INPUT_EMBEDS in reader.stored["corrupted"]
    token_level = reader.run["params"].get("corruption", "str") == "str"
    if any(TOKENS not in reader.stored[side] for side in SIDES) or not (noised or token_level):
        return 0
    clean, corrupted = (reader.tensor(side, TOKENS, span, torch.long) for side in SIDES)
    differs = clean != corrupted
    if noised:
        differs |= (reader.tensor("corrupted", INPUT_EMBEDS, span) != e.embed(clean)).any(-1)
    at = differs.any(0).nonzero()
    return int(at[0]) if len(at) else differs.shape[1]


class _BaseRun:
    """The base run's residual stream where receivers pin their inputs, read once per span, and
    its queries, keys and values at positions < `stop`, projected once per layer. `whole`: the
    layers whose residual some variant reads at every position (the first receivers' layers,
    receivers' layers); of the others only prefixes are read."""

    def __init__(
        self,
        e: Engine,
        reader: Reader,
        span: Span,
        side: str,
        last: torch.Tensor,
        stop: int,
        whole: set[int],
    ):
        self.e, self.reader, self.span, self.side, self.last = e, reader, span, side, last
        self.stop, self.whole = stop, whole
        self.cache: dict[str, torch.Tensor] = {}

    def get(self, short: str, layer: int, upto: int | None = None) -> torch.Tensor:
        """resid_pre / resid_mid of a layer (layer = n_layers: the final residual), at
        positions < `upto` alone where given and the layer is not read whole (a derived
        residual then costs only those)."""
        name = final_hook(self.e.n_layers) if layer == self.e.n_layers else hook_name(short, layer)
        if upto is None or layer in self.whole or name in self.cache:
            if name not in self.cache:
                self.cache[name] = self.reader.tensor(self.side, name, self.span)
            return self.cache[name][:, :upto]
        key = f"{name}[:{upto}]"
        if key not in self.cache:
            at = tuple(range(upto))
            self.cache[key] = self.reader.tensor(self.side, name, self.span, positions=at)
        return self.cache[key]

    def final(self) -> torch.Tensor:
        """The base run's final residual at each prompt's last position (B, D)."""
        resid = self.get("resid_pre", self.e.n_layers)
        return resid[torch.arange(resid.shape[0], device=resid.device), self.last]

    def pinned(self, layer: int, s0: int, dl: torch.Tensor, mlp: bool = False) -> torch.Tensor:
        """Receivers' pinned input at positions s0.. (n, B, T, D): the base run's input to the
        layer's heads (resid_pre) or MLP (resid_mid; resid_pre in parallel blocks) + Δ `dl`."""
        short = "resid_mid" if mlp and not self.e.arch.parallel else "resid_pre"
        return self.get(short, layer)[:, s0 : s0 + dl.shape[2]] + dl

    def projected(self, what: str, layer: int, upto: int | None = None) -> torch.Tensor:
        """The base run's queries ("q", (B, stop, heads, d_head)), or keys or values ("k", "v",
        per key/value head) of a layer; at positions < `upto` only where given (a prefix: the
        layers after the first receivers' read no more of the base run), all of them projected
        once on a layer read whole."""
        length = self.stop if upto is None or layer in self.whole else upto
        key = f"{what}.{layer}.{length}"
        if key not in self.cache:
            resid = self.get("resid_pre", layer, None if length == self.stop else length)
            resid = resid[:, :length]
            pos = torch.arange(length, device=resid.device)
            normed = self.e.ln1(layer, resid)
            if what == "q":
                self.cache[key] = self.e.q(layer, normed, pos)
            else:
                k, v = self.e.kv(layer, normed, pos)
                self.cache[f"k.{layer}.{length}"], self.cache[f"v.{layer}.{length}"] = k, v
        return self.cache[key][:, :upto]

    def prefix(
        self, layer: int, s0: int, per_query_head: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The base run's keys and values (B, s0, heads, d_head) of a layer at positions < s0:
        one copy per key/value head, or per query head (`per_query_head`); None when s0 = 0."""
        if s0 == 0:
            return None
        k, v = (self.projected(x, layer, s0) for x in "kv")
        if not per_query_head:
            return k, v
        group = torch.arange(self.e.n_heads, device=k.device) // self.e.arch.group_size
        return k[:, :, group], v[:, :, group]


def _layer(node: Node, n_layers: int) -> int:
    return n_layers if node.kind == "logits" else node.layer


def _deltas(
    e: Engine, reader: Reader, span: Span, senders: set[Node], base: str, src: str
) -> dict[Node, torch.Tensor]:
    """Each sender's output in the source run − in the base run, (B, T, D)."""
    out: dict[Node, torch.Tensor] = {}
    for layer in sorted({s.layer for s in senders if s.kind == "a"}):
        z = {side: reader.tensor(side, hook_name("z", layer), span) for side in (base, src)}
        share = {side: e.head_outputs(layer, z[side])[0] for side in z}
        for s in senders:
            if s.kind == "a" and s.layer == layer:
                out[s] = share[src][:, :, s.head] - share[base][:, :, s.head]
    for s in senders:
        if s.kind == "m":
            name = hook_name("mlp_out", s.layer)
            out[s] = reader.tensor(src, name, span) - reader.tensor(base, name, span)
    return out


def _run(
    e: Engine,
    state: _BaseRun,
    start: int,
    s0: int,
    receivers: list[Receiver],
    dl: torch.Tensor,
    metric: str,
    t,
    fast: bool,
) -> torch.Tensor:
    """Per-variant, per-prompt metric (n, B) of variants whose first receiver is at `start`,
    recomputed from position s0 on: `dl` (n, B, T − s0, D) is each variant's Δ there."""
    n, B, T, D = dl.shape
    H = e.n_heads
    dev = dl.device
    heads: dict[int, torch.Tensor] = {}  # layer -> (3, n, H) bool: q, k, v receivers
    mlps: dict[int, torch.Tensor] = {}  # layer -> (n,) bool
    logits = torch.zeros(n, dtype=torch.bool, device=dev)
    for v, r in enumerate(receivers):
        for m in r.members:
            if m.kind == "a":
                mask = heads.setdefault(m.layer, torch.zeros(3, n, H, dtype=torch.bool, device=dev))
                mask["qkv".index(m.qkv), v, m.head] = True
            elif m.kind == "m":
                mlps.setdefault(m.layer, torch.zeros(n, dtype=torch.bool, device=dev))[v] = True
            else:
                logits[v] = True
    rows, tail = torch.arange(B, device=dev), state.last - s0
    if start == e.n_layers:
        final = state.final().expand(n, B, D)
    else:
        resid = None  # every variant's residual is the base run's up to the first receivers
        for layer in range(start, e.n_layers):
            # on the last layer only the final positions' queries onwards, where fast
            at = tail if fast and layer == e.n_layers - 1 else None
            if resid is None and fast:
                resid = _first_layer(e, state, layer, s0, dl, heads.get(layer), mlps.get(layer),
                                     at)  # fmt: skip
                continue
            if resid is None:
                resid = state.get("resid_pre", layer)[:, s0 : s0 + T].expand(n, B, T, D)
            prefix = state.prefix(layer, s0, per_query_head=layer in heads)
            if layer in heads:
                pinned = state.pinned(layer, s0, dl)
                z = _attention(e, layer, resid, pinned, heads[layer], s0, prefix, at)
            else:
                z = _attention(e, layer, resid, None, None, s0, prefix, at)
            here = resid if at is None else resid[:, rows, at][:, :, None]
            mid = here + e.attn_residual(layer, e.attn_out(layer, z))
            x = here if e.arch.parallel else mid
            if layer in mlps:
                pinned = _at(state.pinned(layer, s0, dl, mlp=True), at)
                x = torch.where(mlps[layer][:, None, None, None], pinned, x)
            resid = mid + e.mlp(layer, x)
        final = resid[:, :, 0] if fast else resid[:, rows, tail]
    if bool(logits.any()):
        direct = state.final() + dl[:, rows, tail]
        final = torch.where(logits[:, None, None], direct, final)
    return from_resid(e, metric, final, t)


def _at(x: torch.Tensor, at: torch.Tensor | None) -> torch.Tensor:
    """x (…, B, T, D) at each prompt's position `at` (B,) as (…, B, 1, D); all of x for None."""
    if at is None:
        return x
    return x[..., torch.arange(x.shape[-3], device=x.device), at, :][..., None, :]


def _first_layer(
    e: Engine,
    state: _BaseRun,
    layer: int,
    s0: int,
    dl: torch.Tensor,
    heads: torch.Tensor | None,
    mlps: torch.Tensor | None,
    at: torch.Tensor | None,
) -> torch.Tensor:
    """The residual (n, B, Tq, D) leaving the first receivers' layer, where every variant enters
    with the base run's residual: the base run's attention (and, in parallel blocks, MLP) once,
    and per variant what its receivers change: their heads' attention from the pinned q, k or v
    input (`heads` (3, n, H)), and the MLP from the pinned input (`mlps` (n,)). Tq is the tail's
    length, or 1 (the final positions) for `at`."""
    n, B, T, D = dl.shape
    stop = s0 + T
    pos = torch.arange(s0, stop, device=dl.device)
    q_pos = pos.expand(B, -1) if at is None else (at + s0)[:, None]
    here = _at(state.get("resid_pre", layer)[:, s0:stop], at)  # (B, Tq, D)
    by_heads = None  # (base MLP input, dz, heads) where variants' inputs differ by heads' z alone
    q, k, v = (state.projected(x, layer) for x in "qkv")
    q_here = _at(q[:, s0:].flatten(-2), at).unflatten(-1, q.shape[-2:])
    z = e.attend(layer, q_here[None], k[None], v[None], q_pos, 0)[0]  # (B, Tq, H, dh)
    mid = here + e.attn_residual(layer, e.attn_out(layer, z))
    if heads is not None:
        changed = heads.any(0)  # (n, H)
        width = int(changed.sum(-1).max())
        order = changed.int().sort(dim=-1, descending=True, stable=True).indices[:, :width]
        valid = changed.gather(1, order)[:, None, None, :, None]  # padding slots: False
        pick = heads.gather(2, order.expand(3, -1, -1))[:, :, None, None, :, None]
        group = order // e.arch.group_size
        w = e.weights.layers[layer]

        def project(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, ids):
            """Each variant's chosen heads' projection (n, B, T, width, d_head) of x."""
            e.flops += 2.0 * x.numel() * width * e.d_head
            out = torch.einsum("nbtd,nmde->nbtme", x, weight[ids])
            return out if bias is None else out + bias[ids][:, None, None]

        def per_variant(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
            """x (B, T, heads, d_head) at each variant's chosen heads: (n, B, T, width, d_head)."""
            return x[:, :, ids].permute(2, 0, 1, 3, 4)

        normed = e.ln1(layer, state.pinned(layer, s0, dl))
        qs = torch.where(pick[0], e.rotate(project(_at(normed, at), w.W_Q, w.b_Q, order), q_pos),
                         per_variant(q_here, order))  # fmt: skip
        ks, vs = per_variant(k, group), per_variant(v, group)
        k_new = e.rotate(project(normed, w.W_K, w.b_K, group), pos)
        ks = torch.cat([ks[:, :, :s0], torch.where(pick[1], k_new, ks[:, :, s0:])], 2)
        v_new = project(normed, w.W_V, w.b_V, group)
        vs = torch.cat([vs[:, :, :s0], torch.where(pick[2], v_new, vs[:, :, s0:])], 2)
        dz = (e.attend(layer, qs, ks, vs, q_pos, 0) - per_variant(z, order)) * valid
        if e.layers[layer].ln1_post is None:  # the attention output is linear in each head's z
            e.flops += 2.0 * dz.numel() * D
            by_heads = (mid, dz, order)
            mid = mid + torch.einsum("nbtmd,nmdD->nbtD", dz, w.W_O[order])
        else:
            spread = F.one_hot(order, e.n_heads).to(dz.dtype)  # (n, width, H)
            z = z + torch.einsum("nmh,nbtmd->nbthd", spread, dz)
            mid = here + e.attn_residual(layer, e.attn_out(layer, z))
    x = here if e.arch.parallel else mid
    if mlps is not None:
        pinned = _at(state.pinned(layer, s0, dl, mlp=True), at)
        x = torch.where(mlps[:, None, None, None], pinned, x)
    elif by_heads is not None and not e.arch.parallel and _heads_pay(e, *by_heads):
        return mid + e.mlp_of_heads(layer, mid, *by_heads)
    return (mid + e.mlp(layer, x)).expand(n, B, -1, D)


def _heads_pay(e: Engine, base: torch.Tensor, dz: torch.Tensor, heads: torch.Tensor) -> bool:
    """Whether `Engine.mlp_of_heads` multiplies less than the MLP of every variant. Per output
    column of the input projections it multiplies distinct heads × d_head rows (W_O·ln2·W) and
    the positions (base) by d_model, and variants × positions × heads each by d_head; the plain
    MLP multiplies variants × positions by d_model."""
    n, rows, m = heads.shape[0], base[..., 0].numel(), heads.shape[1]
    D, distinct = e.arch.d_model, int(heads.unique().numel())
    return distinct * e.d_head * D + rows * D + n * rows * m * e.d_head < n * rows * D


def _attention(
    e: Engine,
    layer: int,
    resid: torch.Tensor,
    pinned: torch.Tensor | None,
    masks: torch.Tensor | None,
    s0: int,
    prefix: tuple[torch.Tensor, torch.Tensor] | None,
    at: torch.Tensor | None = None,
) -> torch.Tensor:
    """z (n, B, Tq, H, dh) of a layer over the residual (n, B, T, D) at positions s0..s0+T-1,
    attending also to the base run's `prefix` keys and values at 0..s0-1: for queries at every
    position (Tq = T), or at each prompt's position s0 + `at` (B,) only (Tq = 1). Receiver heads
    read their q, k or v input from the pinned residual (n, B, T, D), per `masks` (3, n, H),
    their keys and values one copy per query head (as `prefix` then is); without receivers
    (pinned None) keys and values stay per key/value head."""
    B, T = resid.shape[1:3]
    pos = torch.arange(s0, s0 + T, device=resid.device)
    q_pos = pos.expand(B, -1) if at is None else (at + s0)[:, None]
    group = torch.arange(e.n_heads, device=resid.device) // e.arch.group_size

    def inputs(x: torch.Tensor) -> list[torch.Tensor]:
        normed = e.ln1(layer, x)
        k, v = e.kv(layer, normed, pos)
        q = e.q(layer, _at(normed, at), q_pos)
        if pinned is None:
            return [q, k, v]
        return [q, k[..., group, :], v[..., group, :]]

    qkv = inputs(resid)
    if pinned is not None and masks is not None:
        qkv = [torch.where(m[:, None, None, :, None], p, f)
               for m, p, f in zip(masks, inputs(pinned), qkv, strict=True)]  # fmt: skip
    return e.attend(layer, *qkv, q_pos, s0, prefix)
