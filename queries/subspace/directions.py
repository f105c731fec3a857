"""Directions to patch along: from a .npy file, or from class means of the run's activations.

Mean-difference directions are fit on the activations at the patched positions (each prompt's
mean over them). `group_by="side"` takes clean minus corrupted activations of the same prompts;
a prompts column (grp, answer, ...) takes the difference of the two class means over clean
activations, or for more classes the top-k directions of the class means around their grand
mean. Column values of the form CLASS:subgroup (IOI's grp is "ABBA:t2") are grouped by CLASS.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from actstore.core.errors import UsageError
from queries.subspace.diagnostics import PatchBatch, orthonormal_basis


def from_file(path: str | Path, dim: int) -> tuple[torch.Tensor, str]:
    """Orthonormal basis of the vectors in a .npy file, and the file's sha256 prefix."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--direction {path}: no such file; give a .npy file, mean-diff or das")
    try:
        vectors = np.load(path, allow_pickle=False)
    except (ValueError, OSError) as exc:
        raise UsageError(f"--direction {path}: not a .npy array ({exc})") from None
    if vectors.ndim not in (1, 2) or vectors.shape[-1] != dim:
        raise UsageError(
            f"--direction {path}: shape {vectors.shape}, but the hook's vectors have {dim} "
            f"dimensions; give shape ({dim},) or (k, {dim})"
        )
    digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
    return orthonormal_basis(vectors, what=f"--direction {path}"), digest


def _masked_mean(acts: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Each prompt's mean activation over its patched positions: (batch, d)."""
    return (acts * mask).sum(1).double() / mask.sum(1).clamp_min(1).double()


def mean_diff(
    batches: Iterable[PatchBatch],
    group_by: str,
    labels: Callable[[np.ndarray], Sequence[Any]],
    k: int,
    clean_first: bool,
) -> torch.Tensor:
    """A (d, k) basis from class means; `clean_first` says which side of a batch is clean.
    `labels` gives a batch's prompts' `group_by` values (a prompts column the caller has
    checked), read batch by batch as the activations are."""
    if group_by == "side":
        total, count = None, 0
        for b in batches:
            clean, corrupted = (b.source, b.base) if clean_first else (b.base, b.source)
            diff = (_masked_mean(clean, b.mask) - _masked_mean(corrupted, b.mask)).sum(0)
            total = diff if total is None else total + diff
            count += b.base.shape[0]
        if k != 1:
            raise UsageError("--group-by side gives one direction; use --k 1 or --basis das")
        return orthonormal_basis(total / max(count, 1), what="mean-diff (clean − corrupted)")
    sums: dict[str, torch.Tensor] = {}
    counts: dict[str, int] = {}
    for b in batches:
        clean = b.source if clean_first else b.base
        means = _masked_mean(clean, b.mask)
        for row, value in enumerate(labels(b.prompt_idx)):
            key = str(value).split(":", 1)[0]
            sums[key] = sums.get(key, 0) + means[row]
            counts[key] = counts.get(key, 0) + 1
    classes = sorted(sums)
    if len(classes) < 2:
        raise UsageError(f"--group-by {group_by}: the training prompts hold one class only")
    centroids = torch.stack([sums[c] / counts[c] for c in classes])
    if len(classes) == 2:
        if k != 1:
            raise UsageError(f"--group-by {group_by}: two classes give one direction; use --k 1")
        return orthonormal_basis(centroids[0] - centroids[1], what="mean-diff")
    centered = centroids - centroids.mean(0)
    _, s, vh = torch.linalg.svd(centered, full_matrices=False)
    if k > int((s > 1e-9 * s[0]).sum()):
        raise UsageError(f"--k {k}: the {len(classes)} class means span fewer dimensions")
    return orthonormal_basis(vh[:k], what="mean-diff")
