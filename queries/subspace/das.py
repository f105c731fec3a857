"""Distributed alignment search: learn a k-dimensional subspace whose patch moves the metric.

The subspace is the column space of Q in the QR decomposition of a free (d, k) parameter, so it
stays orthonormal under gradient descent. Each step patches the training batch along it, reruns
only the layers downstream of the hook (the batch's `run`), and moves the patched metric toward
the source run's value: up the clean–corrupted gap when denoising, down it when noising.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from actstore.core.errors import UsageError
from actstore.model.metrics import from_logits
from queries.subspace.diagnostics import PatchBatch, patch


def basis_of(param: torch.Tensor) -> torch.Tensor:
    return torch.linalg.qr(param).Q


def train_das(
    batches: Callable[[], Iterable[PatchBatch]],
    dim: int,
    k: int,
    metric: str,
    direction: str,
    seed: int = 0,
    epochs: int = 20,
    lr: float = 0.05,
) -> tuple[torch.Tensor, list[float]]:
    """Learn a (dim, k) orthonormal basis; returns it (float64) and the mean loss per epoch.
    Only the basis is a parameter: the batches' downstream runs compute with detached weights."""
    gen = torch.Generator().manual_seed(seed)
    param = torch.randn(dim, k, generator=gen, dtype=torch.float32)
    history: list[float] = []
    opt = None
    for _ in range(epochs):
        total, count = 0.0, 0
        for batch in batches():
            if opt is None:
                param = param.to(batch.base.device).requires_grad_(True)
                opt = torch.optim.Adam([param], lr=lr)
            target = batch.clean_logits if direction == "denoise" else batch.corrupted_logits
            base = batch.corrupted_logits if direction == "denoise" else batch.clean_logits
            with torch.no_grad():
                toward = torch.sign(
                    from_logits(metric, target, batch.targets).mean()
                    - from_logits(metric, base, batch.targets).mean()
                )
            logits = batch.run(patch(batch.base, batch.source, batch.mask, basis_of(param)))
            loss = -toward * from_logits(metric, logits, batch.targets).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
            total += float(loss.detach()) * batch.base.shape[0]
            count += batch.base.shape[0]
        history.append(total / max(count, 1))
    if opt is None:
        raise UsageError("DAS has no training prompts; use more prompts or a larger --train-frac")
    return basis_of(param.detach()).double().cpu(), history
