"""Activations a run does not store, computed on read from those it does, with the engine's
own block pieces (so every family's norms, parallel blocks and post-norms are the model's).

`Derivation` holds one side of one batch: `get(hook)` returns the stored values when the run
holds the hook and otherwise derives them (actstore.model.derivable has the rules), computing each
intermediate once:
- the residual entering layer 0 is the embedding of the tokens (a Gaussian-noise corrupted side
  reads its stored input embeddings instead);
- the residual entering l+1 is the one entering l plus the attention's residual contribution
  (z of l through W_O, and the post-attention norm where the family has one) plus the MLP of
  resid_mid (of the residual entering l under parallel attention and MLP);
- resid_mid, attn_out and mlp_out are those partial sums and contributions (mlp_out as the
  difference of stored residuals when both are stored: no MLP runs);
- logits are the unembedding of the final residual at each prompt's final position.
Every rule but the logits' is position-wise (the attention is in the stored z), so a derivation
may hold only some positions of every array: then it computes at those alone.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from actstore.model import derivable as names
from actstore.model.hooks import parse_hook
from queries.core.engine import Engine

Read = Callable[[str], "torch.Tensor | None"]
DERIVED_KINDS = ("resid_pre", "resid_mid", "resid_post", "attn_out", "mlp_out")


class Derivation:
    """One side of one batch: stored activations read once, the others derived once.

    `read(hook)` returns a stored hook's values for the batch as a float32 tensor, or None when
    the run does not store it; `finals` (B,) is each prompt's final position (for logits).
    With `positions` (P,) `read` returns only those positions (B, P, …) of every hook and the
    derived activations are those positions' (no logits then: they need the final ones).
    """

    def __init__(
        self,
        engine: Engine,
        read: Read,
        finals: torch.Tensor | None = None,
        positions: torch.Tensor | None = None,
    ):
        self.engine = engine
        self.read = read
        self.finals = finals
        self.positions = positions
        self.values: dict[str, torch.Tensor | None] = {}
        self.n_layers = engine.n_layers

    def stored(self, hook: str) -> torch.Tensor | None:
        if hook not in self.values:
            self.values[hook] = self.read(hook)
        return self.values[hook]

    def get(self, hook: str) -> torch.Tensor:
        """The activation `hook` (a TransformerLens hook name, `logits` or `tokens`)."""
        found = self.stored(hook)
        if found is not None:
            return found
        value = self._derive(hook)
        self.values[hook] = value
        return value

    def _derive(self, hook: str) -> torch.Tensor:
        if hook == names.LOGITS:
            final = self.residual(self.n_layers)
            rows = torch.arange(final.shape[0], device=final.device)
            if self.finals is None or self.positions is not None:
                raise ValueError("deriving logits needs each prompt's final position")
            return self.engine.unembed(final[rows, self.finals])
        parsed = parse_hook(hook)
        if parsed is None or parsed[1] not in DERIVED_KINDS:
            raise KeyError(f"{hook} is not stored and cannot be derived")
        layer, kind = parsed
        if kind == "resid_pre":
            return self.residual(layer)
        if kind == "resid_post":
            return self.residual(layer + 1)
        if kind == "attn_out":
            return self.attn(layer)
        if kind == "resid_mid":
            if self.engine.arch.parallel:
                raise KeyError(f"{hook}: parallel attention and MLP have no resid_mid")
            return self.residual(layer) + self.attn(layer)
        return self.mlp(layer)

    def residual(self, i: int) -> torch.Tensor:
        """The residual stream entering layer i (i = n_layers: after the last layer)."""
        key = f"residual.{i}"
        if key in self.values:
            return self.values[key]  # type: ignore[return-value]
        for name in names.residual_names(i, self.n_layers):
            found = self.stored(name)
            if found is not None:
                self.values[key] = found
                return found
        if i == 0:
            value = self.stored(names.INPUT_EMBEDS)
            if value is None:
                value = self.engine.embed(self.get(names.TOKENS).long(), self.positions)
        else:
            value = self._step(i - 1)
        self.values[key] = value
        return value

    def attn(self, layer: int) -> torch.Tensor:
        """The attention's residual contribution of `layer`, from its stored z."""
        key = f"attn.{layer}"
        if key not in self.values:
            e, z = self.engine, self.get(names.z(layer))
            self.values[key] = e.attn_residual(layer, e.attn_out(layer, z))
        return self.values[key]  # type: ignore[return-value]

    def mlp(self, layer: int) -> torch.Tensor:
        """The MLP's residual contribution of `layer`: a difference of stored residuals when
        both are stored, else the engine's MLP."""
        key = f"mlp.{layer}"
        if key in self.values:
            return self.values[key]  # type: ignore[return-value]
        after = [self.stored(n) for n in names.residual_names(layer + 1, self.n_layers)]
        after = [a for a in after if a is not None]
        if after:
            value = after[0] - (self.residual(layer) + self.attn(layer))
            self.values[key] = value
            return value
        self._step(layer)
        return self.values[key]  # type: ignore[return-value]

    def _step(self, layer: int) -> torch.Tensor:
        """The residual entering layer+1, recording the MLP's contribution on the way."""
        pre, attn = self.residual(layer), self.attn(layer)
        if self.engine.arch.parallel:
            mlp = self.engine.mlp(layer, pre)
            post = pre + attn + mlp
        else:
            mid = pre + attn
            mlp = self.engine.mlp(layer, mid)
            post = mid + mlp
        self.values[f"mlp.{layer}"] = mlp
        return post
