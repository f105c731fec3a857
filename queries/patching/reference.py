"""The slow exact path: one full forward per patched variant, patched by a TransformerLens hook.

It runs the bridge's own forward on the base run's tokens with resid_pre of block 0 replaced by
the cached one (the embedding, noise included for a Gaussian corruption), so none of the engine's
code is involved. It exists to check the downstream recompute (`queries.patching.recompute`)
against, variant by variant.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from actstore.model.adapter import ModelAdapter
from actstore.model.hooks import hook_name
from queries.patching.batch import Batch
from queries.patching.recompute import Group, Variant

# The activation a component's patch replaces, by its short hook name.
PATCHED = {"head": "z", "resid": "resid_pre", "attn-out": "attn_out", "mlp-out": "mlp_out"}


def _source(batch: Batch, component: str, layer: int) -> torch.Tensor:
    if component == "attn-out":
        return batch.src.attn(layer)
    return batch.src[PATCHED[component]][layer]


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
            hook_name(PATCHED[g.component], layer),
            _setter(_source(batch, g.component, layer), index),
        )
        for layer in v.layers
    ]
    hooks.insert(
        0, (hook_name("resid_pre", 0), _setter(batch.base["resid_pre"][0], (slice(None),)))
    )
    logits = model.hooked_logits(batch.base_tokens, hooks)
    rows = torch.arange(batch.size, device=logits.device)
    return logits[rows, batch.finals]
