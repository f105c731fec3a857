"""Batches of a run for edge queries: every node's clean and corrupted output, read through the
query core's reader.

Node outputs per prompt batch, as (batch, pos, n_forward, d_model) in the graph's forward order:
the input node is `blocks.0.hook_resid_pre` (for Gaussian runs the corrupted side holds the
noised embedding), a head is its stored z times W_O[h] (no share of b_O, see the edge model), an
MLP its stored `hook_mlp_out`. Batches follow the run's chunks, so memory is bounded by one batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from actstore.hooks import hook_name
from actstore.store import Store
from queries.attribution.model import EdgeModel
from queries.core.metrics import AnswerSets, Targets
from queries.core.reader import Reader, Span


@dataclass
class EdgeBatch:
    """Prompts [lo, hi) of a run: positions, answers, stored logits and node outputs."""

    lo: int
    hi: int
    last: torch.Tensor  # (batch,) final position of each prompt
    answer: torch.Tensor
    wrong: torch.Tensor
    clean_logits: torch.Tensor  # (batch, vocab) at the final position
    corrupted_logits: torch.Tensor
    clean: torch.Tensor  # (batch, pos, n_forward, d_model)
    corrupted: torch.Tensor
    sets: AnswerSets | None = None  # the prompts' answer sets (None: answer and wrong alone)

    @property
    def targets(self) -> Targets:
        """What the metrics compare against."""
        return Targets(self.answer, self.wrong, self.clean_logits, self.sets)


def required_hooks(n_layers: int) -> list[str]:
    """What edge queries read: resid_pre of block 0, and z and mlp_out of every layer."""
    hooks = [hook_name("resid_pre", 0)]
    for layer in range(n_layers):
        hooks += [hook_name("z", layer), hook_name("mlp_out", layer)]
    return hooks


def check_run(store: Store, run: dict, model: EdgeModel) -> None:
    """Refuse, before any work, a run that lacks a hook edge queries read."""
    reader = Reader(store, run, model.adapter.device, model.engine)
    reader.require(required_hooks(model.shape.n_layers), "edge attribution")


def _node_outputs(reader: Reader, side: str, span: Span, model: EdgeModel) -> torch.Tensor:
    cols = [reader.tensor(side, hook_name("resid_pre", 0), span)[:, :, None]]
    for layer in range(model.shape.n_layers):
        cols.append(model.head_outputs(reader.tensor(side, hook_name("z", layer), span), layer))
        cols.append(reader.tensor(side, hook_name("mlp_out", layer), span)[:, :, None])
    return torch.cat(cols, dim=2)


def iter_batches(store: Store, run: dict, model: EdgeModel) -> Iterator[EdgeBatch]:
    """The run's prompts in its ingest batches, with everything an edge query reads."""
    reader = Reader(store, run, model.adapter.device, model.engine)
    with torch.no_grad():
        for span in reader.spans():
            t = reader.targets(span)
            yield EdgeBatch(
                lo=span.lo,
                hi=span.hi,
                last=reader.finals(span),
                answer=t.answer,
                wrong=t.wrong,
                clean_logits=t.clean_logits,
                corrupted_logits=reader.tensor("corrupted", "logits", span),
                clean=_node_outputs(reader, "clean", span, model),
                corrupted=_node_outputs(reader, "corrupted", span, model),
                sets=t.sets,
            )
