"""Patching metrics, all in one place: logit difference, answer probability, KL(clean ‖ patched)
and probability difference over answer sets.

Every metric is per prompt at that prompt's final position and averaged over prompts:
- logit-diff: mean logit of the correct answer set − mean logit of the incorrect set; with one
  answer and one wrong answer (every task but Greater-Than) logit(answer) − logit(wrong answer);
  needs only the sets' unembedding columns;
- prob: softmax probability of the answer; needs the full vocabulary's normaliser;
- kl: KL(clean ‖ patched) = Σ_v p_clean(v) (log p_clean(v) − log p_patched(v)) over the full
  vocabulary, with the clean logits read from the run's stored `logits` array;
- prob-diff: Σ p(correct set) − Σ p(incorrect set) (Hanna et al.'s Greater-Than metric: the
  years above the start year against those at or below it);
- accuracy: 1 where the correct answer (set) scores above the incorrect one, else 0, so its mean
  is the share of prompts answered right (Merullo et al.); a set's score is Σ p over its members
  (with one answer each: logit(answer) > logit(wrong answer)); needs only the sets' columns.
  Not differentiable: attribution refuses it.
The normalised effect is (m_patched − m_corrupted) / (m_clean − m_corrupted) for both directions,
so 1 means clean-like and 0 corrupted-like whether clean was patched in or out.

Importing this module does not import torch; the functions take and return tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Protocol

import numpy as np

# The metrics that need only the answer sets' unembedding columns.
COLUMN_METRICS = ("logit-diff", "accuracy")

if TYPE_CHECKING:
    import polars as pl
    import torch


class Unembedding(Protocol):
    """What `from_resid` needs of a model (the queries' engine has both)."""

    def unembed(self, resid: torch.Tensor) -> torch.Tensor: ...

    def unembed_columns(self, resid: torch.Tensor, columns: torch.Tensor) -> torch.Tensor: ...


@dataclass
class AnswerSets:
    """Each prompt's correct and incorrect answer tokens, padded to a rectangle.

    Padding repeats a member and carries weight 0 in the mask, so a gather never leaves the
    vocabulary and padded entries add nothing.
    """

    correct: torch.Tensor  # (B, A) token ids
    correct_mask: torch.Tensor  # (B, A) 1.0 for a member, 0.0 for padding
    incorrect: torch.Tensor  # (B, W)
    incorrect_mask: torch.Tensor

    @classmethod
    def from_arrays(
        cls, arrays: dict[str, np.ndarray], lo: int, hi: int, device: str | torch.device
    ) -> AnswerSets:
        """Prompts [lo, hi) of `answer_arrays`' padded sets as tensors."""
        import torch

        def t(name: str, dtype: torch.dtype) -> torch.Tensor:
            return torch.as_tensor(arrays[name][lo:hi], dtype=dtype, device=device)

        return cls(t("correct", torch.long), t("correct_mask", torch.float32),
                   t("incorrect", torch.long), t("incorrect_mask", torch.float32))  # fmt: skip


def normalized(value: float, clean: float, corrupted: float, tol: float = 0.0) -> float | None:
    """The normalised effect (value − m_corrupted) / (m_clean − m_corrupted): 1 clean-like, 0
    corrupted-like; None when clean and corrupted differ by `tol` or less (undefined)."""
    gap = clean - corrupted
    return None if abs(gap) <= tol else (value - corrupted) / gap


def answer_arrays(prompts: pl.DataFrame) -> dict[str, np.ndarray]:
    """A run's answer sets (`prompts.answer_tokens`, `wrong_answer_tokens`) as padded arrays
    `correct`, `correct_mask`, `incorrect`, `incorrect_mask`, one row per prompt."""
    return padded_sets(prompts["answer_tokens"].to_list(), prompts["wrong_answer_tokens"].to_list())


def padded_sets(correct: list[list[int]], incorrect: list[list[int]]) -> dict[str, np.ndarray]:
    """Each prompt's correct and incorrect token sets as `answer_arrays` pads them."""
    out: dict[str, np.ndarray] = {}
    for name, sets in (("correct", correct), ("incorrect", incorrect)):
        width = max((len(s) for s in sets), default=1)
        ids = np.zeros((len(sets), width), dtype=np.int64)
        mask = np.zeros((len(sets), width), dtype=np.float32)
        for i, members in enumerate(sets):
            ids[i] = members[0]  # padding repeats a member, masked out
            ids[i, : len(members)] = members
            mask[i, : len(members)] = 1.0
        out[name], out[f"{name}_mask"] = ids, mask
    return out


@dataclass
class Targets:
    """What a metric compares against, per prompt of a batch."""

    answer: torch.Tensor  # (B,) token ids
    wrong: torch.Tensor  # (B,)
    clean_logits: torch.Tensor  # (B, d_vocab) at the final position, from the store
    sets: AnswerSets | None = None  # None: the answer and the wrong answer alone

    def answer_sets(self) -> AnswerSets:
        if self.sets is not None:
            return self.sets
        ones = self.answer.new_ones(self.answer.shape[0], 1, dtype=self.clean_logits.dtype)
        return AnswerSets(self.answer[:, None], ones, self.wrong[:, None], ones)


def logit_diff(logits: torch.Tensor, sets: AnswerSets) -> torch.Tensor:
    """Mean logit of the correct set − mean logit of the incorrect set, per prompt:
    (…, B, d_vocab) → (…, B)."""
    return _mean(_columns(logits, sets.correct), sets.correct_mask) - _mean(
        _columns(logits, sets.incorrect), sets.incorrect_mask
    )


def answer_prob(logits: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Softmax probability of the answer token, per prompt."""
    return _pick(logits.float().log_softmax(-1), answer).exp()


def prob_diff(logits: torch.Tensor, sets: AnswerSets) -> torch.Tensor:
    """Σ p(correct set) − Σ p(incorrect set), per prompt."""
    probs = logits.float().softmax(-1)
    return _sum(_columns(probs, sets.correct), sets.correct_mask) - _sum(
        _columns(probs, sets.incorrect), sets.incorrect_mask
    )


def kl_clean_patched(clean_logits: torch.Tensor, patched_logits: torch.Tensor) -> torch.Tensor:
    """KL(clean ‖ patched) summed over the vocabulary, per prompt."""
    clean = clean_logits.float().log_softmax(-1)
    patched = patched_logits.float().log_softmax(-1)
    return (clean.exp() * (clean - patched)).sum(-1)


def from_logits(metric: str, logits: torch.Tensor, t: Targets) -> torch.Tensor:
    """Per-prompt metric of final-position logits (…, B, d_vocab) → (…, B)."""
    if metric == "logit-diff":
        return logit_diff(logits, t.answer_sets())
    if metric == "prob":
        return answer_prob(logits, t.answer)
    if metric == "kl":
        return kl_clean_patched(t.clean_logits, logits)
    if metric == "prob-diff":
        return prob_diff(logits, t.answer_sets())
    if metric == "accuracy":
        s = t.answer_sets()
        return set_accuracy(set_columns(logits, s), s)
    raise ValueError(f"unknown metric {metric!r}")


def endpoints(metric: str, t: Targets, corrupted_logits: torch.Tensor) -> tuple[float, float]:
    """Σ over a batch's prompts of the metric at the stored clean and corrupted logits: the two
    ends that normalised effects and faithfulness are measured between."""
    clean = from_logits(metric, t.clean_logits, t)
    return float(clean.sum()), float(from_logits(metric, corrupted_logits, t).sum())


def from_resid(e: Unembedding, metric: str, resid: torch.Tensor, t: Targets) -> torch.Tensor:
    """Per-prompt metric of final-position residuals (…, B, d_model), unembedding only what the
    metric needs: the answer sets' columns for a logit difference, the full vocabulary
    otherwise."""
    import torch

    if metric in COLUMN_METRICS:
        s = t.answer_sets()
        columns = e.unembed_columns(resid, torch.cat([s.correct, s.incorrect], -1))
        return (set_logit_diff if metric == "logit-diff" else set_accuracy)(columns, s)
    return from_logits(metric, e.unembed(resid), t)


def set_columns(logits: torch.Tensor, sets: AnswerSets) -> torch.Tensor:
    """The logits of the sets' columns (…, B, A + W), correct set first."""
    import torch

    return _columns(logits, torch.cat([sets.correct, sets.incorrect], -1))


def set_accuracy(columns: torch.Tensor, sets: AnswerSets) -> torch.Tensor:
    """1.0 where the correct set's probability mass exceeds the incorrect set's (compared as
    log-sum-exp of their logits: the softmax normaliser cancels), else 0.0: (…, B, A + W) →
    (…, B)."""
    a = sets.correct.shape[-1]
    return (_logsumexp(columns[..., :a], sets.correct_mask)
            > _logsumexp(columns[..., a:], sets.incorrect_mask)).to(columns.dtype)  # fmt: skip


def _logsumexp(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """log Σ exp over a set's members, padding left out."""
    return values.float().masked_fill(mask == 0, float("-inf")).logsumexp(-1)


def set_logit_diff(columns: torch.Tensor, sets: AnswerSets) -> torch.Tensor:
    """The logit difference from the logits of the sets' columns (…, B, A + W), correct set
    first: mean over the correct set − mean over the incorrect set."""
    a = sets.correct.shape[-1]
    return _mean(columns[..., :a], sets.correct_mask) - _mean(columns[..., a:],
                                                              sets.incorrect_mask)  # fmt: skip


def _pick(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    index = ids.view(*([1] * (x.dim() - 2)), -1, 1).expand(*x.shape[:-1], 1)
    return x.gather(-1, index).squeeze(-1)


def _columns(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """Each prompt's entries of x at its ids: x (…, B, V), ids (B, k) → (…, B, k)."""
    return x.gather(-1, ids.expand(*x.shape[:-2], *ids.shape))


def _sum(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Σ over a set's members (mask 1), padding (mask 0) left out: (…, B, k) → (…, B)."""
    return (values * mask.to(values.dtype)).sum(-1)


def _mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return _sum(values, mask) / mask.sum(-1).to(values.dtype)
