"""Which activations an ingest stores: short names over layers, or TransformerLens hook names.

The default set is what patching and attribution read: resid_pre, resid_mid and attention z of
every layer, mlp_out of every layer and the final residual stream. A family whose attention and
MLP run in parallel (GPT-NeoX, GPT-J) has no resid_mid: it stores attn_out instead. A head's
output is z·W_O, computed on read rather than stored n_heads times larger. Keys and values have
the model's key/value heads (fewer than its query heads under grouped-query attention).
"""

from __future__ import annotations

from actstore.errors import UsageError
from actstore.hooks import FINAL, PER_LAYER, final_hook, layer_hooks
from actstore.models import ModelAdapter


def default_hooks(model: ModelAdapter) -> tuple[str, ...]:
    """The short names of the default set for the model's family."""
    attn = "attn_out" if model.architecture.parallel else "resid_mid"
    return ("resid_pre", attn, "z", "mlp_out", "resid_final")


def resolve_hooks(model: ModelAdapter, spec: str | None) -> list[str]:
    """Expand a --hooks value ("default,mlp_post", "z", "blocks.3.hook_resid_pre") to hook names."""
    items = [s.strip() for s in (spec or "default").split(",") if s.strip()]
    if not items:
        raise UsageError("--hooks is empty; give short names such as default,mlp_post")
    known = model.hook_names()
    names: list[str] = []
    for item in items:
        expanded: list[str]
        if item == "default":
            expanded = resolve_hooks(model, ",".join(default_hooks(model)))
        elif item == FINAL:
            expanded = [final_hook(model.shape.n_layers)]
        elif item in PER_LAYER:
            expanded = layer_hooks(item, model.shape.n_layers)
            if expanded[0] not in known:
                raise UsageError(
                    f"hook {item!r}: {model.spec} has no {expanded[0]} (a "
                    f"{model.architecture.family} model); use default or another hook"
                )
        elif item in known:
            expanded = [item]
        else:
            raise UsageError(
                f"unknown hook {item!r}; use default, resid_final, "
                f"{', '.join(PER_LAYER)} or a TransformerLens hook name such as "
                "blocks.0.hook_resid_pre"
            )
        names.extend(h for h in expanded if h not in names)
    return names
