"""Which activations an ingest stores: short names over layers, or TransformerLens hook names.

The default set, `lean`, stores only what cannot be recomputed (actstore.model.derivable): z of
every layer, the residual entering every RESID_EVERY-th layer from RESID_EVERY on, and the final
residual; the rest (layer 0's residual from the tokens, the other residuals, resid_mid,
attn_out, mlp_out, logits) is derived on read, exactly. `full` stores verbatim, besides, what
patching and attribution read: resid_pre, resid_mid and mlp_out of every layer and the final
position's logits (a family whose attention and MLP run in parallel, GPT-NeoX and GPT-J, has no
resid_mid: attn_out instead); that is the layout of stores written before derivation. A head's
output is z·W_O, computed on read rather than stored n_heads times larger. Keys and values have
the model's key/value heads (fewer than its query heads under grouped-query attention).
`resid_pre/K` stores the residual entering every K-th layer and `logits` the final position's
logits, which any set without the final residual stores (it cannot derive them).
"""

from __future__ import annotations

from actstore.core.errors import UsageError
from actstore.model.adapter import ModelAdapter
from actstore.model.derivable import LOGITS
from actstore.model.hooks import FINAL, PER_LAYER, final_hook, hook_name, layer_hooks

# The residual is stored entering every RESID_EVERY-th layer by `lean`: 2 is the largest stride
# whose derived layers each need one MLP on read, and the smallest that meets the bytes-per-prompt
# target at GPT-2-small shape (measured by benchmarks/ingestion.py; README, Storage).
RESID_EVERY = 2
LEAN = (f"resid_pre/{RESID_EVERY}", "z", FINAL)
# `default` is what an ingest without --hooks stores.
DEFAULT = "lean"
# The names --hooks takes besides short names, strides and hook names.
KEYWORDS = ("default", "lean", "full", FINAL, LOGITS)


# More layers than any model has: a larger resid_pre/K is refused before the model loads.
MAX_LAYERS = 10_000


def full_hooks(model: ModelAdapter) -> tuple[str, ...]:
    """The short names of the full set (everything the queries read, stored) for the family."""
    attn = "attn_out" if model.architecture.parallel else "resid_mid"
    return ("resid_pre", attn, "z", "mlp_out", FINAL, LOGITS)


def resolve_hooks(model: ModelAdapter, spec: str | None) -> list[str]:
    """Expand a --hooks value ("default,mlp_post", "z", "blocks.3.hook_resid_pre") to hook names.

    The final position's logits are stored too (`logits`) when the set lacks the final residual
    they are derived from."""
    items = _items(spec)
    names = _expand(model, items)
    if final_hook(model.shape.n_layers) not in names and LOGITS not in names:
        names.append(LOGITS)
    return names


def _expand(model: ModelAdapter, items: list[str]) -> list[str]:
    known = model.hook_names()
    names: list[str] = []
    for item in items:
        expanded: list[str]
        if item == "default":
            expanded = _expand(model, [DEFAULT])
        elif item == "lean":
            expanded = _expand(model, list(LEAN))
        elif item == "full":
            expanded = _expand(model, list(full_hooks(model)))
        elif item == FINAL:
            expanded = [final_hook(model.shape.n_layers)]
        elif item == LOGITS:
            expanded = [LOGITS]
        elif item.startswith("resid_pre/"):
            every, n = _stride(item), model.shape.n_layers
            if every >= n:
                raise UsageError(
                    f"hook {item!r}: {model.spec} has {n} layers, so resid_pre/{every} names "
                    f"none; give K from 1 to {n - 1}"
                )
            expanded = [hook_name("resid_pre", i) for i in range(every, n, every)]
        elif item in PER_LAYER:
            expanded = layer_hooks(item, model.shape.n_layers)
            if expanded[0] not in known:
                raise UsageError(
                    f"hook {item!r}: {model.spec} has no {expanded[0]} (a "
                    f"{model.architecture.family} model); use default, full or another hook"
                )
        elif item in known:
            expanded = [item]
        else:
            raise _unknown(item)
        names.extend(h for h in expanded if h not in names)
    return names


def check_hooks(spec: str | None) -> None:
    """Refuse, without the model (and so before torch is imported), a --hooks value that names
    no hook in any model: an empty list, a bad stride, a word that is neither a short name nor
    shaped like a TransformerLens hook name. Whether the model has a hook is checked later."""
    items = _items(spec)
    for item in items:
        if item.startswith("resid_pre/"):
            _stride(item)
        elif item not in KEYWORDS and item not in PER_LAYER and not _hook_shaped(item):
            raise _unknown(item)


def _items(spec: str | None) -> list[str]:
    items = [s.strip() for s in ("default" if spec is None else spec).split(",") if s.strip()]
    if not items:
        raise UsageError("--hooks is empty; give short names such as default,mlp_post")
    return items


def _hook_shaped(item: str) -> bool:
    """Every TransformerLens hook name ends in a `hook_...` part."""
    return item.rsplit(".", 1)[-1].startswith("hook_")


def _unknown(item: str) -> UsageError:
    return UsageError(
        f"unknown hook {item!r}; use default (lean), full, resid_final, logits, "
        f"resid_pre/K, {', '.join(PER_LAYER)} or a TransformerLens hook name such as "
        "blocks.0.hook_resid_pre"
    )


def _stride(item: str) -> int:
    every = item.split("/", 1)[1]
    if not every.isdigit() or len(every) > 6 or not 1 <= int(every) <= MAX_LAYERS:
        raise UsageError(
            f"hook {item[:40]!r}: give resid_pre/K with K a positive integer below the model's "
            f"number of layers (at most {MAX_LAYERS})"
        )
    return int(every)
