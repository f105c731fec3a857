"""Metrics of SPEC.md at the final position, per prompt: callers take the mean over prompts.

Every function takes final-position logits of shape (batch, vocab) and returns shape (batch,),
so the same code serves patched runs, stored clean/corrupted logits and gradient training.
"""

from __future__ import annotations

import torch


def logit_diff(logits: torch.Tensor, answer: torch.Tensor, wrong: torch.Tensor) -> torch.Tensor:
    """logit(answer) − logit(wrong answer)."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits[rows, answer] - logits[rows, wrong]


def answer_prob(logits: torch.Tensor, answer: torch.Tensor) -> torch.Tensor:
    """Softmax probability of the answer token."""
    rows = torch.arange(logits.shape[0], device=logits.device)
    return logits.float().softmax(-1)[rows, answer]


def kl_clean_patched(clean_logits: torch.Tensor, patched_logits: torch.Tensor) -> torch.Tensor:
    """KL(clean ‖ patched), summed over the vocabulary."""
    clean = clean_logits.float().log_softmax(-1)
    patched = patched_logits.float().log_softmax(-1)
    return (clean.exp() * (clean - patched)).sum(-1)
