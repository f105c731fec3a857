"""Tree patching against the dense edge forward: the same logits for circuits of every kind."""

from __future__ import annotations

from unittest.mock import patch

import numpy as np
import torch

from queries.attribution import tree
from queries.attribution.edge_batches import edge_reader, read_batch
from queries.attribution.edge_model import EdgeModel
from queries.attribution.tree import CLEAN, COMPUTED, CORRUPTED, TreePatcher


def masks_of_every_kind(model: EdgeModel, seed: int = 0) -> dict[str, np.ndarray]:
    """Kept-edge masks: none, all, one edge, all but one, top-N of random scores at several
    sizes (pruned by nothing, so with dead nodes) and unstructured random masks."""
    g = model.graph
    rng = np.random.default_rng(seed)
    rows, cols = g.edge_cells
    scores = rng.normal(size=len(rows))
    order = np.argsort(-np.abs(scores))
    out: dict[str, np.ndarray] = {}

    def mask(chosen: np.ndarray) -> np.ndarray:
        m = np.zeros((g.n_forward, g.n_backward), dtype=bool)
        m[rows[chosen], cols[chosen]] = True
        return m

    out["none"] = mask(order[:0])
    out["all"] = g.real.copy()
    out["one"] = mask(order[:1])
    out["all but one"] = g.real & ~mask(order[:1])
    for frac in (0.01, 0.1, 0.5, 0.9):
        out[f"top {frac}"] = mask(order[: max(1, int(frac * len(order)))])
    for p in (0.05, 0.5, 0.97):
        out[f"random {p}"] = g.real & (rng.random(g.real.shape) < p)
    return out


def assert_tree_equals_dense(store, run: dict, model: EdgeModel, tol: float = 1e-5) -> list[int]:
    """Every mask's tree-patched logits equal the dense forward's within `tol` on every batch of
    the run, alone and with all the masks side by side in one forward, with every node status
    seen; returns each batch's first computed position."""
    patcher = TreePatcher(model)
    g = model.graph
    seen: set[int] = set()
    starts = []
    masks = masks_of_every_kind(model)
    reader = edge_reader(store, run, model)
    for batch in (read_batch(reader, span, model) for span in reader.spans()):
        tb = patcher.batch(batch.clean, batch.corrupted, batch.last)
        starts.append(tb.start)
        alone = {}
        for name, kept in masks.items():
            seen |= set(patcher.statuses(kept).tolist())
            dropped = torch.as_tensor(g.real & ~kept, dtype=torch.float32)
            with torch.no_grad():
                dense = model.run(batch.clean[:, :, 0], batch.last, batch.corrupted, dropped)
            for cost in (tree.GATHER_COST, 0, 10**9):  # as chosen, always gathered, never
                with patch.object(tree, "GATHER_COST", cost), torch.no_grad():
                    fast = patcher.logits(tb, kept)
                diff = float((fast - dense.logits).abs().max())
                assert diff <= tol, f"{name}, gather cost {cost}: {diff} from the dense forward"
            alone[name] = fast
        for cost in (tree.GATHER_COST, 0, 10**9):  # every circuit side by side in one forward
            with patch.object(tree, "GATHER_COST", cost), torch.no_grad():
                together = patcher.logits_many(tb, list(masks.values()))
            for name, logits in zip(masks, together, strict=True):
                diff = float((logits - alone[name]).abs().max())
                assert diff <= tol, f"{name} among all, gather cost {cost}: {diff} from alone"
    assert seen == {CORRUPTED, CLEAN, COMPUTED}
    return starts
