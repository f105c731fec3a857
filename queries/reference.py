"""The slow exact path: one full forward per patched variant, patched by a TransformerLens hook.

It runs the bridge's own forward on the base run's tokens with resid_pre of block 0 replaced by
the cached one (the embedding, noise included for a Gaussian corruption), so none of the engine's
code is involved. It exists to check the downstream recompute (`queries.recompute`) against,
variant by variant.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from actstore.models import ModelAdapter
from queries.activations import Batch
from queries.recompute import Group, Variant

HOOK_NAMES = {
    "head": "blocks.{l}.attn.hook_z",
    "resid": "blocks.{l}.hook_resid_pre",
    "attn-out": "blocks.{l}.hook_attn_out",
    "mlp-out": "blocks.{l}.hook_mlp_out",
}


def _source(batch: Batch, component: str, layer: int) -> torch.Tensor:
    src = batch.src
    if component == "head":
        return src["z"][layer]
    if component == "resid":
        return src["pre"][layer]
    if component == "attn-out":
        return src.attn(layer)
    return src["mlp"][layer]


def _setter(value: torch.Tensor, index: tuple) -> Callable[..., torch.Tensor]:
    def hook(act: torch.Tensor, hook=None) -> torch.Tensor:
        act[index] = value[index].to(act.dtype)
        return act

    return hook


def final_logits(model: ModelAdapter, batch: Batch, g: Group, v: Variant) -> torch.Tensor:
    """Logits (B, d_vocab) at each prompt's final position of one patched full forward."""
    index: tuple = (slice(None), slice(None) if g.pos is None else g.pos)
    if g.component == "head":
        index = (*index, v.head)
    hooks = [
        (
            HOOK_NAMES[g.component].format(l=layer),
            _setter(_source(batch, g.component, layer), index),
        )
        for layer in v.layers
    ]
    hooks.insert(0, ("blocks.0.hook_resid_pre", _setter(batch.base["pre"][0], (slice(None),))))
    logits = model.hooked_logits(batch.base_tokens, hooks)
    rows = torch.arange(batch.size, device=logits.device)
    return logits[rows, batch.finals]
