"""Patching metrics, all in one place: logit difference, answer probability, KL(clean ‖ patched).

Every metric is per prompt at that prompt's final position and averaged over prompts:
- logit-diff: logit(answer) − logit(wrong answer); needs two unembedding columns only;
- prob: softmax probability of the answer; needs the full vocabulary's normaliser;
- kl: KL(clean ‖ patched) = Σ_v p_clean(v) (log p_clean(v) − log p_patched(v)) over the full
  vocabulary, with the clean logits read from the run's stored `logits` array.
The normalised effect is (m_patched − m_corrupted) / (m_clean − m_corrupted) for both directions,
so 1 means clean-like and 0 corrupted-like whether clean was patched in or out.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

if TYPE_CHECKING:
    from queries.core.engine import Engine

METRICS = ("logit-diff", "prob", "kl")


@dataclass
class Targets:
    """What a metric compares against, per prompt of a batch."""

    answer: torch.Tensor  # (B,) token ids
    wrong: torch.Tensor  # (B,)
    clean_logits: torch.Tensor  # (B, d_vocab) at the final position, from the store


def logit_diff(logits: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """logit(answer) − logit(wrong answer), per prompt: (…, B, d_vocab) → (…, B)."""
    return _pick(logits, answer) - _pick(logits, wrong)


def answer_prob(logits: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Softmax probability of the answer token, per prompt."""
    return _pick(logits.float().log_softmax(-1), answer).exp()


def kl_clean_patched(clean_logits: torch.Tensor, patched_logits: torch.Tensor) -> torch.Tensor:
    """KL(clean ‖ patched) summed over the vocabulary, per prompt."""
    clean = clean_logits.float().log_softmax(-1)
    patched = patched_logits.float().log_softmax(-1)
    return (clean.exp() * (clean - patched)).sum(-1)


def from_logits(metric: str, logits: torch.Tensor, t: Targets) -> torch.Tensor:
    """Per-prompt metric of final-position logits (…, B, d_vocab) → (…, B)."""
    if metric == "logit-diff":
        return logit_diff(logits, t.answer, t.wrong)
    if metric == "prob":
        return answer_prob(logits, t.answer)
    if metric == "kl":
        return kl_clean_patched(t.clean_logits, logits)
    raise ValueError(f"unknown metric {metric!r}")


def from_resid(e: Engine, metric: str, resid: torch.Tensor, t: Targets) -> torch.Tensor:
    """Per-prompt metric of final-position residuals (…, B, d_model), unembedding only what the
    metric needs: two columns for a logit difference, the full vocabulary otherwise."""
    if metric == "logit-diff":
        pair = e.unembed_columns(resid, torch.stack([t.answer, t.wrong], -1))
        return pair[..., 0] - pair[..., 1]
    return from_logits(metric, e.unembed(resid), t)


def logits_metric_fn(
    metric: str, finals: torch.Tensor, t: Targets
) -> Callable[[torch.Tensor], torch.Tensor]:
    """The same metric as a function of full-sequence logits (B, seq, d_vocab) → mean over
    prompts: the form TransformerLens' patching functions take."""
    rows = torch.arange(finals.shape[0])

    def fn(logits: torch.Tensor) -> torch.Tensor:
        return from_logits(metric, logits[rows, finals], t).mean()

    return fn


def _pick(x: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    index = ids.view(*([1] * (x.dim() - 2)), -1, 1).expand(*x.shape[:-1], 1)
    return x.gather(-1, index).squeeze(-1)
