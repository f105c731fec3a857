"""Which activations an ingest stores: short names over layers, or TransformerLens hook names.

The default set is what patching and attribution read: resid_pre, resid_mid and attention z of
every layer, mlp_out of every layer and the final residual stream. A family whose attention and
MLP run in parallel (GPT-NeoX, GPT-J) has no resid_mid: it stores attn_out instead. A head's
output is z·W_O, computed on read rather than stored n_heads times larger. Keys and values have
the model's key/value heads (fewer than its query heads under grouped-query attention).

`lean` stores only what cannot be recomputed (actstore.derivable): z of every layer, the
residual entering every RESID_EVERY-th layer from RESID_EVERY on, and the final residual; the
rest (layer 0's residual from the tokens, the other residuals, resid_mid, attn_out, mlp_out,
logits) is derived on read. `resid_pre/K` stores the residual entering every K-th layer and
`logits` the final position's logits.
"""

from __future__ import annotations

from actstore.derivable import LOGITS
from actstore.errors import UsageError
from actstore.models import ModelAdapter

# The residual is stored entering every RESID_EVERY-th layer by `lean`: 2 is the largest stride
# whose derived layers each need one MLP on read, and the smallest that meets 2.2 MB per prompt
# at GPT-2-small shape (benchmarks/ingest.py).
RESID_EVERY = 2
LEAN = (f"resid_pre/{RESID_EVERY}", "z", "resid_final")

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


def default_hooks(model: ModelAdapter) -> tuple[str, ...]:
    """The short names of the default set for the model's family."""
    attn = "attn_out" if model.architecture.parallel else "resid_mid"
    return ("resid_pre", attn, "z", "mlp_out", "resid_final")


def resolve_hooks(model: ModelAdapter, spec: str | None) -> list[str]:
    """Expand a --hooks value ("default,mlp_post", "z", "blocks.3.hook_resid_pre") to hook names.

    The final position's logits are stored too (`logits`), except with `lean`, which derives
    them from the final residual."""
    items = [s.strip() for s in (spec or "default").split(",") if s.strip()]
    if not items:
        raise UsageError("--hooks is empty; give short names such as default,mlp_post")
    names = _expand(model, items)
    if "lean" not in items and LOGITS not in names:
        names.append(LOGITS)
    return names


def _expand(model: ModelAdapter, items: list[str]) -> list[str]:
    known = model.hook_names()
    final = f"blocks.{model.shape.n_layers - 1}.hook_resid_post"
    names: list[str] = []
    for item in items:
        expanded: list[str]
        if item == "default":
            expanded = _expand(model, list(default_hooks(model)))
        elif item == "lean":
            expanded = _expand(model, list(LEAN))
        elif item == "resid_final":
            expanded = [final]
        elif item == LOGITS:
            expanded = [LOGITS]
        elif item.startswith("resid_pre/"):
            every = _stride(item)
            expanded = [PER_LAYER["resid_pre"].format(l=i)
                        for i in range(every, model.shape.n_layers, every)]  # fmt: skip
        elif item in PER_LAYER:
            expanded = [PER_LAYER[item].format(l=i) for i in range(model.shape.n_layers)]
            if expanded[0] not in known:
                raise UsageError(
                    f"hook {item!r}: {model.spec} has no {expanded[0]} (a "
                    f"{model.architecture.family} model); use default or another hook"
                )
        elif item in known:
            expanded = [item]
        else:
            raise UsageError(
                f"unknown hook {item!r}; use default, lean, resid_final, logits, resid_pre/K, "
                f"{', '.join(PER_LAYER)} or a TransformerLens hook name such as "
                "blocks.0.hook_resid_pre"
            )
        names.extend(h for h in expanded if h not in names)
    return names


def _stride(item: str) -> int:
    every = item.split("/", 1)[1]
    if not every.isdigit() or int(every) < 1:
        raise UsageError(f"hook {item!r}: give resid_pre/K with K a positive integer")
    return int(every)


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
