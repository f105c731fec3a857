"""One batch of a run's cached activations for patching, both sides, every layer.

Patching never reruns the base run or the source run: both come from the store through the
query core's reader. `resid_pre[n_layers]` is the residual stream after the last block (the
stored `resid_final`). The attention's residual contribution is resid_mid − resid_pre where the
family has a resid_mid, else the stored `attn_out` (parallel attention and MLP).
A sweep that patches only some positions reads the source side at those alone (on a lean run a
derived residual then costs an MLP at those positions, not at all): its other positions are NaN,
so that a read of them could not go unnoticed.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from actstore.model.hooks import final_hook, layer_hooks
from actstore.model.metrics import AnswerSets, Targets
from queries.core.reader import Reader, Span, sides


@dataclass
class Side:
    """One side's cached activations: short hook name ("resid_pre", "resid_mid", "z", "mlp_out",
    "attn_out") → list over layers."""

    acts: dict[str, list[torch.Tensor]]

    def __getitem__(self, kind: str) -> list[torch.Tensor]:
        return self.acts[kind]

    def attn(self, layer: int) -> torch.Tensor:
        """The attention's residual contribution: stored, or resid_mid − resid_pre."""
        if "attn_out" in self.acts:
            return self.acts["attn_out"][layer]
        return self.acts["resid_mid"][layer] - self.acts["resid_pre"][layer]


@dataclass
class Batch:
    """Prompts [lo, hi) of a run: the base run patched into, the source patched from."""

    lo: int
    hi: int
    finals: torch.Tensor  # (B,) each prompt's final position
    targets: Targets
    base: Side
    src: Side
    base_logits: torch.Tensor  # (B, d_vocab) stored final logits of the base run
    corrupted_logits: torch.Tensor
    base_tokens: torch.Tensor | None = None  # (B, seq), read for the full-forward reference

    @property
    def size(self) -> int:
        return int(self.finals.shape[0])

    def subset(self, rows: torch.Tensor) -> Batch:
        """The batch of some of its prompts (`rows`: indices into this batch)."""

        def pick(side: Side) -> Side:
            return Side({k: [t[rows] for t in ts] for k, ts in side.acts.items()})

        t = self.targets
        sets = None if t.sets is None else AnswerSets(
            t.sets.correct[rows], t.sets.correct_mask[rows], t.sets.incorrect[rows],
            t.sets.incorrect_mask[rows])  # fmt: skip
        return Batch(
            lo=self.lo,
            hi=self.hi,
            finals=self.finals[rows],
            targets=Targets(t.answer[rows], t.wrong[rows], t.clean_logits[rows], sets),
            base=pick(self.base),
            src=pick(self.src),
            base_logits=self.base_logits[rows],
            corrupted_logits=self.corrupted_logits[rows],
            base_tokens=None if self.base_tokens is None else self.base_tokens[rows],
        )


def hooks_read(kinds: set[str], n_layers: int) -> list[str]:
    """The hook names a side's kinds cover (resid_pre with the final residual stream)."""
    names = [h for kind in sorted(kinds) for h in layer_hooks(kind, n_layers)]
    return names + ([final_hook(n_layers)] if "resid_pre" in kinds else [])


def read_side(
    reader: Reader,
    side: str,
    kinds: set[str],
    n_layers: int,
    span: Span,
    positions: tuple[int, ...] | None = None,
) -> Side:
    """A side's activations of `kinds` at every layer; with `positions`, only those are read
    (the others NaN)."""
    acts = {}
    for kind in sorted(kinds):
        names = hooks_read({kind}, n_layers)
        acts[kind] = [_at(reader, side, name, span, positions) for name in names]
    return Side(acts)


def _at(
    reader: Reader, side: str, hook: str, span: Span, positions: tuple[int, ...] | None
) -> torch.Tensor:
    if positions is None:
        return reader.tensor(side, hook, span)
    values = reader.tensor(side, hook, span, positions=positions)
    seq = int(reader.run["seq_len"])
    full = values.new_full((values.shape[0], seq, *values.shape[2:]), float("nan"))
    full[:, list(positions)] = values
    return full


def read_batch(
    reader: Reader,
    direction: str,
    base_kinds: set[str],
    src_kinds: set[str],
    n_layers: int,
    span: Span,
    tokens: bool = False,
    src_positions: tuple[int, ...] | None = None,
) -> Batch:
    """The span's batch; `src_positions`: the only positions read from the source side."""
    base_side, src_side = sides(direction)
    targets = reader.targets(span)
    corrupted = reader.tensor("corrupted", "logits", span)
    return Batch(
        lo=span.lo,
        hi=span.hi,
        finals=reader.finals(span),
        targets=targets,
        base=read_side(reader, base_side, base_kinds, n_layers, span),
        src=read_side(reader, src_side, src_kinds, n_layers, span, src_positions),
        base_logits=targets.clean_logits if base_side == "clean" else corrupted,
        corrupted_logits=corrupted,
        base_tokens=reader.tensor(base_side, "tokens", span, torch.long) if tokens else None,
    )
