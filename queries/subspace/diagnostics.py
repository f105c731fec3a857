"""Subspace activation patching and the interpretability-illusion diagnostics.

Makelov, Lange & Nanda (*Is This the Subspace You Are Looking For?*) show that patching a
direction v can move the output through a dormant pathway: v's component in the nullspace of the
weights that read the activation correlates with the feature but cannot act, and v's rowspace
component acts but is dormant (near-zero variance) on the data. Patching v then writes the
nullspace component's difference into the rowspace direction. The diagnostics below split v by
the reading map W, measure each part's variance and patching effect, and flag that pattern.

This module is model-agnostic: a `PatchBatch` carries the activations at one site and a function
that runs the rest of the network from a patched activation, so the same code serves the store
(queries/subspace/sites.py) and a network built in code (the tests' distilled example).
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import numpy as np
import polars as pl
import torch

from actstore.core.errors import UsageError
from actstore.model.metrics import AnswerSets, Targets, endpoints, from_logits, normalized

# Illusion thresholds. An effect is the shift of the normalised metric away from the unpatched
# run (1.0 = the whole clean–corrupted gap). v is flagged when it moves the metric by at least
# ILLUSION_MIN_EFFECT, at least ILLUSION_EFFECT_RATIO times as much as its rowspace component
# alone, and the rowspace component's variance per dimension is at most ILLUSION_DORMANCY times v's.
ILLUSION_MIN_EFFECT = 0.1
ILLUSION_EFFECT_RATIO = 2.0
ILLUSION_DORMANCY = 0.1
RANK_TOL = 1e-6
# A part of v (its rowspace or nullspace component) whose share of v, ‖part‖², is below this is
# floating-point round-off, not a direction: it is reported absent and never patched. (Scaled
# to unit length, a 1e-15 residual would become an arbitrary direction with a real effect.)
ROUND_OFF_SHARE = 1e-10


@dataclass
class PatchBatch:
    """One batch of prompts at one patching site.

    `base` is the activation of the run being patched, `source` the one patched in (denoising:
    corrupted and clean), both (batch, pos, d); `mask` (batch, pos, 1) is 1 at patched positions;
    `run` maps a patched site activation to final-position logits (batch, vocab); `prompt_idx`
    names the batch's prompts when they come from a store.
    """

    base: torch.Tensor
    source: torch.Tensor
    mask: torch.Tensor
    run: Callable[[torch.Tensor], torch.Tensor]
    answer: torch.Tensor
    wrong: torch.Tensor
    clean_logits: torch.Tensor
    corrupted_logits: torch.Tensor
    prompt_idx: np.ndarray | None = None
    sets: AnswerSets | None = None  # answer sets (None: the answer and the wrong answer alone)

    @property
    def targets(self) -> Targets:
        """What the metrics compare against."""
        return Targets(self.answer, self.wrong, self.clean_logits, self.sets)


def orthonormal_basis(vectors: np.ndarray | torch.Tensor, what: str = "direction") -> torch.Tensor:
    """(d, k) orthonormal basis of the span of `vectors` given as (d,) or (k, d) rows."""
    v = torch.as_tensor(np.asarray(vectors, dtype=np.float64))
    if v.ndim == 1:
        v = v[None]
    if v.ndim != 2 or v.shape[0] == 0:
        raise UsageError(f"{what}: give shape (d,) or (k, d), got {tuple(v.shape)}")
    if not torch.isfinite(v).all():
        raise UsageError(f"{what}: contains NaN or infinite values")
    basis = _span(v.T)
    if basis.shape[1] == 0:
        raise UsageError(f"{what}: the vectors are zero; give a non-zero direction")
    return basis


def _span(m: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis (d, r) of the column space of m (d, k), numerically rank-revealing."""
    if m.shape[1] == 0:
        return m
    u, s, _ = torch.linalg.svd(m.double(), full_matrices=False)
    if s.numel() == 0 or s[0] <= 0:
        return m.new_zeros(m.shape[0], 0, dtype=torch.float64)
    return u[:, s > RANK_TOL * s[0]]


def split_by_map(basis: torch.Tensor, w: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float]:
    """Split span(basis) by the map a -> a @ w: (rowspace basis, nullspace basis, ‖v_null‖²).

    The rowspace of the map is the column space of w (what the reader can see); its orthogonal
    complement is the kernel. ‖v_null‖² is the squared norm of the projection of the unit
    direction onto the kernel (for k > 1: the mean over the basis vectors). A part whose
    directions carry less than ROUND_OFF_SHARE of v is absent: its basis has no columns, and
    ‖v_null‖² is exactly 0 (no nullspace part) or 1 (no rowspace part).
    """
    readable = _span(w.double())
    row = readable @ (readable.T @ basis)
    null = basis - row
    row_part, null_part = _part(row), _part(null)
    if not null_part.shape[1]:
        return row_part, null_part, 0.0
    if not row_part.shape[1]:
        return row_part, null_part, 1.0
    return row_part, null_part, float((null**2).sum() / basis.shape[1])


def _part(m: torch.Tensor) -> torch.Tensor:
    """Orthonormal basis of a projection of an orthonormal basis, round-off dropped: its
    singular values are cosines (at most 1), so the threshold is absolute."""
    u, s, _ = torch.linalg.svd(m.double(), full_matrices=False)
    return u[:, s**2 > ROUND_OFF_SHARE]


def patch(base: torch.Tensor, source: torch.Tensor, mask: torch.Tensor, basis: torch.Tensor | None):
    """base + V Vᵀ (source − base) at masked positions; `basis` None patches everything."""
    delta = source - base
    if basis is not None:
        b = basis.to(base.device, base.dtype)
        delta = (delta @ b) @ b.T
    return base + mask * delta


@dataclass
class Moments:
    """Streaming variance of activations projected on an orthonormal basis."""

    n: float = 0.0
    total: torch.Tensor | None = None
    squares: torch.Tensor | None = None

    def add(self, acts: torch.Tensor, mask: torch.Tensor, basis: torch.Tensor | None) -> None:
        keep = mask[..., 0].bool()
        x = acts[keep].double()
        proj = x if basis is None else x @ basis.to(x.device, torch.float64)
        s, q = proj.sum(0), (proj**2).sum(0)
        self.total = s if self.total is None else self.total + s
        self.squares = q if self.squares is None else self.squares + q
        self.n += x.shape[0]

    def variance_per_dim(self) -> float:
        if self.n < 2 or self.total is None:
            return float("nan")
        mean = self.total / self.n
        var = (self.squares / self.n - mean**2).clamp_min(0)
        return float(var.mean())


@dataclass
class Evaluation:
    """Sums over prompts of each component's patched metric, and the reference metrics."""

    n: int = 0
    patched: dict[str, float] = field(default_factory=dict)
    clean: float = 0.0
    corrupted: float = 0.0
    moments: dict[str, Moments] = field(default_factory=dict)

    def mean(self, name: str) -> float:
        return self.patched[name] / self.n


def evaluate(
    batches: Iterable[PatchBatch], components: dict[str, torch.Tensor | None], metric: str
) -> Evaluation:
    """Patch each component's subspace in every batch; sum metrics, accumulate variances."""
    ev = Evaluation(patched={name: 0.0 for name in components})
    ev.moments = {name: Moments() for name in components}
    with torch.no_grad():
        for batch in batches:
            ev.n += batch.base.shape[0]
            clean, corrupted = endpoints(metric, batch.targets, batch.corrupted_logits)
            ev.clean, ev.corrupted = ev.clean + clean, ev.corrupted + corrupted
            for name, basis in components.items():
                logits = batch.run(patch(batch.base, batch.source, batch.mask, basis))
                ev.patched[name] += float(from_logits(metric, logits, batch.targets).sum())
                for acts in (batch.base, batch.source):
                    ev.moments[name].add(acts, batch.mask, basis)
    if ev.n == 0:
        raise UsageError("no prompts to evaluate on; use more prompts or a larger --train-frac")
    return ev


def _normalized(value: float, clean: float, corrupted: float) -> float:
    """The normalised effect; NaN when clean and corrupted agree."""
    norm = normalized(value, clean, corrupted, tol=1e-12)
    return float("nan") if norm is None else norm


def is_illusion(effect_v: float, effect_row: float, var_v: float, var_row: float) -> bool:
    """The dormant-pathway pattern: v acts, its rowspace part alone does not and is dormant."""
    return bool(
        abs(effect_v) >= ILLUSION_MIN_EFFECT
        and abs(effect_v) >= ILLUSION_EFFECT_RATIO * abs(effect_row)
        and var_row <= ILLUSION_DORMANCY * var_v
    )


COMPONENTS = ("v", "row", "null", "full")


def report(
    ev: Evaluation, direction: str, dims: dict[str, int], null_sq: float | None
) -> pl.DataFrame:
    """One row per component: dim, ‖·‖² share of v, variance, patched metric, effect, flag.

    `effect` is the normalised metric minus that of the unpatched run (0 when denoising, 1 when
    noising), so it measures how far the patch moved the output in either direction. A part of v
    that is absent (dim 0: v lies wholly in the other part) was not patched: its row says so
    with norm 0, variance 0 and the unpatched run's metric, effect 0.
    """
    clean, corrupted = ev.clean / ev.n, ev.corrupted / ev.n
    base = 0.0 if direction == "denoise" else 1.0
    unpatched = corrupted if direction == "denoise" else clean
    share = {"v": 1.0, "row": None, "null": None, "full": None}
    if null_sq is not None:
        share.update(row=1.0 - null_sq, null=null_sq)
    rows = []
    for name in (c for c in COMPONENTS if c in dims):
        if name not in ev.patched:
            rows.append(
                {"component": name, "dim": 0, "norm_sq": 0.0, "variance": 0.0,
                 "value": unpatched, "normalized": _normalized(unpatched, clean, corrupted),
                 "effect": 0.0}
            )  # fmt: skip
            continue
        value = ev.mean(name)
        norm = _normalized(value, clean, corrupted)
        rows.append(
            {"component": name, "dim": dims[name], "norm_sq": share.get(name),
             "variance": ev.moments[name].variance_per_dim(), "value": value,
             "normalized": norm, "effect": norm - base}
        )  # fmt: skip
    frame = pl.DataFrame(rows)
    by = {r["component"]: r for r in rows}
    flag = None
    if "row" in by and by["row"]["dim"]:
        flag = is_illusion(
            by["v"]["effect"], by["row"]["effect"], by["v"]["variance"], by["row"]["variance"]
        )
    elif null_sq is not None:  # v lies wholly in the kernel: nothing it could act through
        flag = False
    return frame.with_columns(pl.lit(flag, dtype=pl.Boolean).alias("illusion"))


def components_of(
    basis: torch.Tensor, w: torch.Tensor | None
) -> tuple[dict[str, torch.Tensor | None], dict[str, int], float | None]:
    """The subspaces a report patches: v, its row/nullspace parts (when W is known), full;
    and every component's dimension (0 for an absent part, which is not patched)."""
    comps: dict[str, torch.Tensor | None] = {"v": basis}
    dims = {"v": basis.shape[1], "full": basis.shape[0]}
    null_sq = None
    if w is not None:
        row, null, null_sq = split_by_map(basis, w)
        for name, part in (("row", row), ("null", null)):
            dims[name] = part.shape[1]
            if part.shape[1]:
                comps[name] = part
    comps["full"] = None
    return comps, dims, null_sq
