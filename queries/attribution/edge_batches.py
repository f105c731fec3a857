"""Batches of a run for edge queries: every node's clean and corrupted output, read through the
query core's reader.

Node outputs per prompt batch, as (batch, pos, n_forward, d_model) in the graph's forward order:
the input node is `blocks.0.hook_resid_pre` (for Gaussian runs the corrupted side holds the
noised embedding), a head is its stored z times W_O[h] (no share of b_O, see the edge model), an
MLP its stored `hook_mlp_out`. Batches follow the run's chunks, so memory is bounded by one batch.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import torch

from actstore.core.store import Store
from actstore.model.hooks import hook_name
from actstore.model.metrics import AnswerSets, Targets
from queries.attribution.edge_model import EdgeModel
from queries.core.reader import Reader, Span
from queries.core.sweep import RunContext, run_context


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
    reader = edge_reader(store, run, model)
    reader.require(required_hooks(model.shape.n_layers), "edge attribution")


def _node_outputs(reader: Reader, side: str, span: Span, model: EdgeModel) -> torch.Tensor:
    cols = [reader.tensor(side, hook_name("resid_pre", 0), span)[:, :, None]]
    for layer in range(model.shape.n_layers):
        cols.append(model.head_outputs(reader.tensor(side, hook_name("z", layer), span), layer))
        cols.append(reader.tensor(side, hook_name("mlp_out", layer), span)[:, :, None])
    return torch.cat(cols, dim=2)


def edge_reader(store: Store, run: dict, model: EdgeModel) -> Reader:
    """The run's reader on the model's device, deriving through the model's engine."""
    return Reader(store, run, model.adapter.device, model.engine)


def read_batch(reader: Reader, span: Span, model: EdgeModel) -> EdgeBatch:
    """Prompts `span` of the run with everything an edge query reads."""
    with torch.no_grad():
        t = reader.targets(span)
        return EdgeBatch(
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


def open_run(location: str, run_id: int, device: str | None) -> tuple[EdgeModel, Reader]:
    """On a Dask worker: the run's edge model and reader, made once per worker (on its run
    context, queries/core/sweep.py) and reused by the tasks after."""
    context = run_context(location, run_id, device)
    return _edge_model(context), context.reader


@functools.lru_cache(maxsize=1)
def _edge_model(context: RunContext) -> EdgeModel:
    return EdgeModel(context.model, context.engine)
