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

A sender restricted to a role (`--positions`) changes nothing before the span's earliest
position of that role: attention is causal, so there every layer holds the base run's values.
Those variants recompute only the tail from that position on; each layer's queries there attend
over the base run's keys and values of the prefix (ln1 of its stored residual, projected once per
span and layer) and their own of the tail, at true positions, so the result is the same as a
full-length recompute (`reuse_prefix=False`, kept to show it).
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence

import numpy as np
import torch

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
    reuse_prefix: bool = True,
) -> np.ndarray:
    """Σ over the span's prompts of the metric of every (pair, role) variant: (n_pairs, n_roles);
    `roles` (n_prompts, n_roles) holds each prompt's position of each role (None: one column,
    every position). `reuse_prefix` recomputes a role's variants only from its earliest
    position in the span (the module docstring)."""
    base, src = sides(direction)
    with torch.no_grad():
        t, last = reader.targets(span), reader.finals(span)
        delta = _deltas(e, reader, span, {s for s, _ in pairs}, base, src)
        B, T, D = next(iter(delta.values())).shape
        if roles is None:
            masks = torch.ones(1, B, T, 1, device=last.device)
            firsts = [0]
        else:
            at = torch.as_tensor(roles[span.index], device=last.device)  # (B, n_roles)
            grid = torch.arange(T, device=last.device)
            masks = (grid[None, None, :] == at.T[:, :, None]).float()[..., None]
            firsts = at.min(0).values.tolist() if reuse_prefix else [0] * at.shape[1]
        variants = [(i, r) for i in range(len(pairs)) for r in range(masks.shape[0])]
        groups: dict[tuple[int, int], list[tuple[int, int]]] = defaultdict(list)
        for i, r in variants:
            start = min(_layer(m, e.n_layers) for m in pairs[i][1].members)
            groups[(start, firsts[r])].append((i, r))
        state = _BaseRun(e, reader, span, base, last)
        out = np.zeros((len(pairs), masks.shape[0]))
        for (start, s0), chosen in sorted(groups.items()):
            step = max(1, VARIANT_ELEMENTS // (B * (T - s0) * D))
            for lo in range(0, len(chosen), step):
                part = chosen[lo : lo + step]
                dl = torch.stack([delta[pairs[i][0]][:, s0:] * masks[r][:, s0:] for i, r in part])
                receivers = [pairs[i][1] for i, _ in part]
                values = _run(e, state, start, s0, receivers, dl, metric, t)
                for (i, r), v in zip(part, values.sum(-1).tolist(), strict=True):
                    out[i, r] = v
    return out


class _BaseRun:
    """The base run's residual stream where receivers pin their inputs, read once per span."""

    def __init__(self, e: Engine, reader: Reader, span: Span, side: str, last: torch.Tensor):
        self.e, self.reader, self.span, self.side, self.last = e, reader, span, side, last
        self.cache: dict[str, torch.Tensor] = {}
        self.kv: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}

    def get(self, short: str, layer: int) -> torch.Tensor:
        """resid_pre / resid_mid of a layer (layer = n_layers: the final residual)."""
        name = final_hook(self.e.n_layers) if layer == self.e.n_layers else hook_name(short, layer)
        if name not in self.cache:
            self.cache[name] = self.reader.tensor(self.side, name, self.span)
        return self.cache[name]

    def final(self) -> torch.Tensor:
        """The base run's final residual at each prompt's last position (B, D)."""
        resid = self.get("resid_pre", self.e.n_layers)
        return resid[torch.arange(resid.shape[0], device=resid.device), self.last]

    def prefix(
        self, layer: int, s0: int, per_query_head: bool
    ) -> tuple[torch.Tensor, torch.Tensor] | None:
        """The base run's keys and values (B, s0, heads, d_head) of a layer at positions < s0:
        one copy per key/value head, or per query head (`per_query_head`); None when s0 = 0."""
        if s0 == 0:
            return None
        key = f"kv.{layer}"
        if key not in self.kv:
            resid = self.get("resid_pre", layer)
            pos = torch.arange(resid.shape[1], device=resid.device)
            self.kv[key] = self.e.kv(layer, self.e.ln1(layer, resid), pos)
        k, v = (x[:, :s0] for x in self.kv[key])
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
        resid = state.get("resid_pre", start)[:, s0:].expand(n, B, T, D)
        for layer in range(start, e.n_layers):
            prefix = state.prefix(layer, s0, per_query_head=layer in heads)
            if layer in heads:
                pinned = state.get("resid_pre", layer)[:, s0:] + dl
                z = _attention(e, layer, resid, pinned, heads[layer], s0, prefix)
            else:
                z = _attention(e, layer, resid, None, None, s0, prefix)
            mid = resid + e.attn_residual(layer, e.attn_out(layer, z))
            x = resid if e.arch.parallel else mid
            if layer in mlps:
                before = "resid_pre" if e.arch.parallel else "resid_mid"
                pinned = state.get(before, layer)[:, s0:] + dl
                x = torch.where(mlps[layer][:, None, None, None], pinned, x)
            resid = mid + e.mlp(layer, x)
        final = resid[:, rows, tail]
    if bool(logits.any()):
        direct = state.final() + dl[:, rows, tail]
        final = torch.where(logits[:, None, None], direct, final)
    return from_resid(e, metric, final, t)


def _attention(
    e: Engine,
    layer: int,
    resid: torch.Tensor,
    pinned: torch.Tensor | None,
    masks: torch.Tensor | None,
    s0: int,
    prefix: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """z (n, B, T, H, dh) of a layer over the residual (n, B, T, D) at positions s0..s0+T-1,
    attending also to the base run's `prefix` keys and values at 0..s0-1. Receiver heads read
    their q, k or v input from the pinned residual (n, B, T, D), per `masks` (3, n, H), their
    keys and values one copy per query head (as `prefix` then is); without receivers (pinned
    None) keys and values stay per key/value head."""
    B, T = resid.shape[1:3]
    pos = torch.arange(s0, s0 + T, device=resid.device)
    group = torch.arange(e.n_heads, device=resid.device) // e.arch.group_size

    def inputs(x: torch.Tensor) -> list[torch.Tensor]:
        normed = e.ln1(layer, x)
        k, v = e.kv(layer, normed, pos)
        if pinned is None:
            return [e.q(layer, normed, pos), k, v]
        return [e.q(layer, normed, pos), k[..., group, :], v[..., group, :]]

    qkv = inputs(resid)
    if pinned is not None and masks is not None:
        qkv = [torch.where(m[:, None, None, :, None], p, f)
               for m, p, f in zip(masks, inputs(pinned), qkv, strict=True)]  # fmt: skip
    return e.attend(layer, *qkv, pos.expand(B, -1), s0, prefix)
