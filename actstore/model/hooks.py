"""Hook names, in one vocabulary: the short name of each per-layer activation, its TransformerLens
hook name, and the per-position shape it is stored with.

Ingest expands short names (--hooks) into hook names; the queries name what they read by short
name and layer. `resid_final` is the residual stream after the last block (the last layer's
resid_post). A head's output is z·W_O, computed on read rather than stored n_heads times larger.
"""

from __future__ import annotations

import re
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from actstore.model.adapter import ModelAdapter

PER_LAYER = {
    "resid_pre": "blocks.{l}.hook_resid_pre",
    "resid_mid": "blocks.{l}.hook_resid_mid",
    "resid_post": "blocks.{l}.hook_resid_post",
    "z": "blocks.{l}.attn.hook_z",
    "q": "blocks.{l}.attn.hook_q",
    "k": "blocks.{l}.attn.hook_k",
    "v": "blocks.{l}.attn.hook_v",
    "pattern": "blocks.{l}.attn.hook_pattern",
    "attn_out": "blocks.{l}.hook_attn_out",
    "mlp_out": "blocks.{l}.hook_mlp_out",
    "mlp_post": "blocks.{l}.mlp.hook_post",
}
FINAL = "resid_final"
_PARSE = re.compile(
    r"^blocks\.(\d+)\.("
    + "|".join(re.escape(t.split("{l}.", 1)[1]) for t in PER_LAYER.values())
    + r")$"
)
_SHORT = {t.split("{l}.", 1)[1]: short for short, t in PER_LAYER.items()}


def hook_name(short: str, layer: int) -> str:
    """The hook name of a per-layer activation: ("z", 3) -> "blocks.3.attn.hook_z"."""
    return PER_LAYER[short].format(l=layer)


def layer_hooks(short: str, n_layers: int) -> list[str]:
    """The activation's hook name at every layer."""
    return [hook_name(short, layer) for layer in range(n_layers)]


def final_hook(n_layers: int) -> str:
    """The hook name under which `resid_final` is stored."""
    return hook_name("resid_post", n_layers - 1)


def parse_hook(hook: str) -> tuple[int, str] | None:
    """(layer, short name) of a per-layer hook name of the vocabulary, else None."""
    m = _PARSE.match(hook)
    return None if m is None else (int(m.group(1)), _SHORT[m.group(2)])


def hook_shape(model: ModelAdapter, hook: str, seq: int) -> tuple[int, ...]:
    """Per-position shape of a hook's activation (after the batch and position axes)."""
    s = model.shape
    last = hook.rsplit(".", 1)[-1]
    if last in ("hook_k", "hook_v", "hook_rot_k"):
        return (model.architecture.n_kv_heads, s.d_head)
    if last in ("hook_z", "hook_q", "hook_rot_q", "hook_result"):
        return (s.n_heads, s.d_head)
    if last == "hook_pattern" or last == "hook_attn_scores":
        return (s.n_heads, seq)
    if hook.endswith("mlp.hook_post") or hook.endswith("mlp.hook_pre"):
        return (s.d_mlp,)
    return (s.d_model,)
