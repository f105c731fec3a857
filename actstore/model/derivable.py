"""Which activations a run need not store: the rules by which the others follow from it.

The residual stream entering layer l+1 is the one entering l plus the attention's contribution
(from z of l, through W_O) plus the MLP's; the stream entering layer 0 is the embedding of the
tokens. So a run that stores z of every layer and the residual at some layers determines every
residual, resid_mid, attn_out and mlp_out, and the final-position logits. The computation lives
with the engine (queries/core/derive.py); these rules need no torch, so ingest records which
hooks a run derives and the store names them in its messages.
"""

from __future__ import annotations

from collections.abc import Iterable
from functools import partial

from actstore.model.hooks import hook_name

LOGITS = "logits"
TOKENS = "tokens"
INPUT_EMBEDS = "input_embeds"


# The hook name of each activation the rules speak of, at a layer: resid_pre(3), z(0), ...
resid_pre, resid_mid, resid_post, attn_out, mlp_out, z = (
    partial(hook_name, form)
    for form in ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out", "z")
)


def residual_names(i: int, n_layers: int) -> list[str]:
    """The hook names of the residual stream entering layer i (i = n_layers: after the last)."""
    names = [resid_pre(i)] if i < n_layers else []
    return names + ([resid_post(i - 1)] if i > 0 else [])


def derivable(stored: Iterable[str], n_layers: int, parallel: bool) -> list[str]:
    """The standard hooks a run storing `stored` (tokens always) does not hold but determines.

    resid_pre of layer 0 is always derivable (the embedding); the residual entering l+1 when
    the one entering l is and z of l is stored; resid_mid, attn_out and mlp_out of l when z of
    l and the residual entering l are (mlp_out also from the residual entering l+1); logits
    when the residual after the last layer is. Parallel attention and MLP has no resid_mid.
    """
    have = set(stored)
    residual = [False] * (n_layers + 1)
    for i in range(n_layers + 1):
        names = residual_names(i, n_layers)
        residual[i] = (
            any(n in have for n in names) or i == 0 or (residual[i - 1] and z(i - 1) in have)
        )
    out: list[str] = []
    for layer in range(n_layers):
        attn_ok = residual[layer] and z(layer) in have
        candidates = [
            (resid_pre(layer), residual[layer]),
            (attn_out(layer), attn_ok),
            (mlp_out(layer), attn_ok),
            (resid_post(layer), residual[layer + 1]),
        ]
        if not parallel:
            candidates.insert(1, (resid_mid(layer), attn_ok))
        out += [name for name, ok in candidates if ok and name not in have]
    if residual[n_layers] and LOGITS not in have:
        out.append(LOGITS)
    return out
