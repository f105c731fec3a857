"""Exact edge effects: every edge of the graph patched alone, the quantity EAP approximates.

The effect of edge s → d is m(clean run with input_d carrying source s's corrupted output) −
m(clean), mean over prompts (noising, as EAP's sign). Patching one edge leaves every node
upstream of d's layer at its clean value, so input_d is the clean input plus Δ_s = corrupted_s −
clean_s, and only d's layer and the layers after it are recomputed:

- into a head's q, k or v input at layer l: ln1 of (clean resid_pre + Δ_s) is projected for
  that input alone and attention runs with the other two inputs clean. One attention pass per
  (source, letter) gives every query head's new z at once, because a head's z reads only its own
  q, k and v (under grouped-query attention a query head reads its key/value head's weights on
  its own input, the edge graph's convention); the variant of head h keeps every other head's
  clean z, so its attention output is computed from z with head h's row replaced;
- into an MLP input at layer l: the MLP runs on (clean input + Δ_s) and resid_pre of l+1 moves by
  the change of its output;
- into the logits: the final residual at the last position moves by Δ_s.

The variants of a layer go through the later blocks along the batch axis, in chunks that bound
memory (`VARIANT_ELEMENTS`); the metric unembeds only the final positions (`from_resid`).
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch

from actstore.model.metrics import Targets, from_resid
from queries.attribution.edge_batches import EdgeBatch
from queries.attribution.edge_model import EdgeModel
from queries.core.engine import Engine

# The most activation elements (variants × prompts × positions × width) one chunk of variants
# holds in a block: 2^25 float32 values, 128 MiB.
VARIANT_ELEMENTS = 1 << 25


def exact_scores(
    model: EdgeModel,
    batch: EdgeBatch,
    metric: str,
    n_total: int,
    sources: np.ndarray | None = None,
) -> torch.Tensor:
    """(n_forward, n_backward): Σ over the batch's prompts of m(edge patched) − m(clean),
    divided by `n_total`, for every edge (zero off the edges); `sources` (forward node indices)
    scores only their edges, e.g. a sample whose time stands for the whole graph's."""
    e, g = model.engine, model.graph
    H, L = e.n_heads, e.n_layers
    t = batch.targets
    clean, delta = batch.clean, batch.corrupted - batch.clean
    B, T = clean.shape[:2]
    rows = torch.arange(B, device=clean.device)
    pos = torch.arange(T, device=clean.device)
    out = torch.zeros(g.n_forward, g.n_backward, device=clean.device)
    chosen = np.arange(g.n_forward) if sources is None else np.unique(sources)
    with torch.no_grad():
        resid = clean[:, :, 0]
        layers = []  # per layer: resid_pre, z, mid, the MLP's output
        for layer in range(L):
            z = e.attention_z(layer, resid)
            mid = resid + e.attn_residual(layer, e.attn_out(layer, z))
            mlp = e.mlp(layer, resid if e.arch.parallel else mid)
            layers.append((resid, z, mid, mlp))
            resid = mid + mlp
        base = from_resid(e, metric, resid[rows, batch.last], t)

        def score(values: torch.Tensor) -> torch.Tensor:  # (n, B) → (n,)
            return (values - base).sum(-1) / n_total

        for layer, (pre, z, mid, mlp) in enumerate(layers):
            start = g.layer_start(layer)
            up = chosen[chosen < int(g.n_upstream[start])]
            if not len(up):
                continue
            for letter, (src, z_new) in enumerate(_head_variants(e, layer, pre, delta, up, pos)):
                # z_new (n, B, T, H, dh): head h's z with its `letter` input patched from src
                for h in range(H):
                    zs = z.expand(z_new.shape[0], -1, -1, -1, -1).clone()
                    zs[..., h, :] = z_new[..., h, :]
                    after = _finish(e, layer, pre, zs, mlp, batch.last, metric, t)
                    out[src, start + letter * H + h] = score(after)
            mlp_col = start + 3 * H
            up = chosen[chosen < int(g.n_upstream[mlp_col])]
            x_in = pre if e.arch.parallel else mid
            for src in _chunks(up, B * T * max(e.arch.d_mlp, e.arch.d_model)):
                moved = e.mlp(layer, x_in + delta[:, :, src].movedim(2, 0)) - mlp
                after = _downstream(e, layer + 1, mid + mlp + moved, batch.last)
                out[src, mlp_col] = score(from_resid(e, metric, after, t))
        final = resid[rows, batch.last] + delta[rows, batch.last][:, chosen].movedim(1, 0)
        out[chosen, g.n_backward - 1] = score(from_resid(e, metric, final, t))
    return out


def _chunks(ids: np.ndarray, per_variant: int) -> Iterator[torch.Tensor]:
    """Runs of the source indices `ids` whose variants fit `VARIANT_ELEMENTS` (at least one
    each)."""
    step = max(1, VARIANT_ELEMENTS // max(per_variant, 1))
    for lo in range(0, len(ids), step):
        yield torch.as_tensor(ids[lo : lo + step])


def _head_variants(
    e: Engine, layer: int, pre: torch.Tensor, delta: torch.Tensor, up: np.ndarray, pos: torch.Tensor
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """For each input letter (q, k, v, in order) and chunk of sources: every head's z when that
    input of the head alone reads resid_pre + Δ_src: per letter, (sources, z (n, B, T, H, dh))."""
    normed = e.ln1(layer, pre)
    q, (k, v) = e.q(layer, normed, pos), e.kv(layer, normed, pos)
    B, T = pre.shape[:2]
    q_pos = pos.expand(B, -1)
    for letter in range(3):
        parts = []
        for src in _chunks(up, B * T * 3 * pre.shape[-1]):
            moved = e.ln1(layer, pre + delta[:, :, src].movedim(2, 0))
            n = moved.shape[0]
            qs, ks, vs = (x.expand(n, *x.shape) for x in (q, k, v))
            if letter == 0:
                qs = e.q(layer, moved, pos)
            else:
                k_new, v_new = e.kv(layer, moved, pos)
                ks, vs = (k_new, vs) if letter == 1 else (ks, v_new)
            parts.append((src, e.attend(layer, qs, ks, vs, q_pos, 0)))
        yield _join(parts)


def _join(parts: list[tuple[torch.Tensor, torch.Tensor]]) -> tuple[torch.Tensor, torch.Tensor]:
    """One (sources, z) from the chunks of one letter, in source order."""
    return torch.cat([src for src, _ in parts]), torch.cat([z for _, z in parts])


def _finish(
    e: Engine,
    layer: int,
    pre: torch.Tensor,
    z: torch.Tensor,
    mlp: torch.Tensor,
    last: torch.Tensor,
    metric: str,
    t: Targets,
) -> torch.Tensor:
    """Per-variant, per-prompt metric (n, B) of runs whose layer `layer` has heads' z (n, B, T,
    H, dh) over the clean resid_pre, everything after recomputed (in chunks of variants); `mlp`
    is the layer's clean MLP output, which a parallel block's MLP keeps."""
    B, T = pre.shape[:2]
    width = max(e.arch.d_mlp, e.arch.d_model)
    values = []
    for part in _chunks(np.arange(z.shape[0]), B * T * width):
        mid = pre + e.attn_residual(layer, e.attn_out(layer, z[part]))
        x = mid + (mlp if e.arch.parallel else e.mlp(layer, mid))
        values.append(from_resid(e, metric, _downstream(e, layer + 1, x, last), t))
    return torch.cat(values)


def _downstream(e: Engine, start: int, x: torch.Tensor, last: torch.Tensor) -> torch.Tensor:
    """Final-position residuals (n, B, D) after blocks [start, n_layers) over variants x
    (n, B, T, D), the variants stacked along the batch axis."""
    n, B, T, D = x.shape
    x = e.run_blocks(x.reshape(n * B, T, D), start).reshape(n, B, T, D)
    return x[:, torch.arange(B, device=x.device), last]
