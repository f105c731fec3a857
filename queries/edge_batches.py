"""Batches of a run for edge queries: every node's clean and corrupted output read from the store.

Node outputs per prompt batch, as (batch, pos, n_forward, d_model) in the graph's forward order:
the input node is `blocks.0.hook_resid_pre` (for Gaussian runs the corrupted side holds the
noised embedding), a head is its stored z times W_O[h] (no share of b_O, see edge_model), an MLP
its stored `hook_mlp_out`. Batches follow the run's chunks, so memory is bounded by one batch.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from actstore.errors import ActstoreError, UsageError
from actstore.store import Store
from queries.edge_model import EdgeModel
from queries.metrics import AnswerSets, Targets, answer_arrays, from_logits


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


def metric_values(metric: str, logits: torch.Tensor, batch: EdgeBatch) -> torch.Tensor:
    """Per-prompt metric of final-position logits (differentiable), as queries.metrics has it."""
    targets = Targets(batch.answer, batch.wrong, batch.clean_logits, batch.sets)
    return from_logits(metric, logits, targets)


def required_hooks(n_layers: int) -> list[str]:
    hooks = ["blocks.0.hook_resid_pre"]
    for layer in range(n_layers):
        hooks += [f"blocks.{layer}.attn.hook_z", f"blocks.{layer}.hook_mlp_out"]
    return hooks


def check_run_hooks(store: Store, run_id: int, n_layers: int) -> None:
    """Edge queries need z, mlp_out and resid_pre 0 on both sides: say so before any work."""
    for side in ("clean", "corrupted"):
        stored = set(store.hooks(run_id, side))
        missing = [h for h in required_hooks(n_layers) if h not in stored]
        if missing:
            raise UsageError(
                f"run {run_id} lacks {side} {missing[0]} (and {len(missing) - 1} more) that edge "
                "attribution reads; re-ingest with --hooks default"
            )


def check_model(store: Store, run: dict, model: EdgeModel) -> None:
    if run["params"].get("fingerprint") not in (None, model.adapter.fingerprint):
        raise ActstoreError(
            f"run {run['run_id']} was ingested with different weights for {run['model']!r} "
            "than the model loaded now; re-ingest the run"
        )


def _node_outputs(store: Store, run_id: int, side: str, lo: int, hi: int, model: EdgeModel):
    dev = model.adapter.device
    cols = [_tensor(store.read(run_id, side, "blocks.0.hook_resid_pre", lo, hi), dev)[:, :, None]]
    for layer in range(model.shape.n_layers):
        z = _tensor(store.read(run_id, side, f"blocks.{layer}.attn.hook_z", lo, hi), dev)
        cols.append(model.head_outputs(z, layer))
        mlp = _tensor(store.read(run_id, side, f"blocks.{layer}.hook_mlp_out", lo, hi), dev)
        cols.append(mlp[:, :, None])
    return torch.cat(cols, dim=2)


def _tensor(array: np.ndarray, device: str) -> torch.Tensor:
    return torch.as_tensor(np.asarray(array, dtype=np.float32), device=device)


def iter_batches(store: Store, run: dict, model: EdgeModel) -> Iterator[EdgeBatch]:
    """The run's prompts in its ingest batches, with everything an edge query reads."""
    run_id = run["run_id"]
    prompts = store.prompts(run_id)
    n = prompts.height
    step = int(run["batch_size"])
    dev = model.adapter.device
    seq_len = np.array(prompts["seq_len"].to_numpy(), dtype=np.int64)
    answer = np.array(prompts["answer_token"].to_numpy(), dtype=np.int64)
    wrong = np.array(prompts["wrong_answer_token"].to_numpy(), dtype=np.int64)
    sets = answer_arrays(prompts)
    with torch.no_grad():
        for lo in range(0, n, step):
            hi = min(n, lo + step)
            yield EdgeBatch(
                lo=lo,
                hi=hi,
                last=torch.as_tensor(seq_len[lo:hi] - 1, dtype=torch.long, device=dev),
                answer=torch.as_tensor(answer[lo:hi], dtype=torch.long, device=dev),
                wrong=torch.as_tensor(wrong[lo:hi], dtype=torch.long, device=dev),
                clean_logits=_tensor(store.read(run_id, "clean", "logits", lo, hi), dev),
                corrupted_logits=_tensor(store.read(run_id, "corrupted", "logits", lo, hi), dev),
                clean=_node_outputs(store, run_id, "clean", lo, hi, model),
                corrupted=_node_outputs(store, run_id, "corrupted", lo, hi, model),
                sets=AnswerSets.from_arrays(sets, lo, hi, dev),
            )
