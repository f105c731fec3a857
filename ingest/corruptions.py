"""Corruptions (Zhang & Nanda): symmetric token replacement and Gaussian noising.

STR uses the task's own corrupted prompt. Gaussian noising keeps the clean prompt and adds
N(0, (3·σ_emb)²) to the token embeddings of the subject tokens, σ_emb the standard deviation of
the model's token embedding matrix. The noise of prompt i depends only on (seed, i), so a resumed
or re-batched ingest draws exactly the same corruption.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

from actstore.core.choices import CORRUPTIONS, check
from actstore.core.errors import UsageError
from actstore.model.adapter import ModelAdapter
from ingest.tasks.base import span_tokens, word_starts

if TYPE_CHECKING:
    import torch

NOISE_SIGMAS = 3.0


def check_corruption(name: str) -> str:
    check("--corruption", name, CORRUPTIONS)
    return name


def embedding_sigma(model: ModelAdapter) -> float:
    """σ_emb: the standard deviation of all entries of the token embedding matrix, as the
    residual stream receives them (times the family's embedding scale: Gemma's √d_model)."""
    return float(model.weights().W_E.std()) * model.architecture.embed_scale


def subject_positions(model: ModelAdapter, text: str, words: Sequence[str]) -> list[int]:
    """Token positions (BOS = 0) of every token overlapping an occurrence of a subject word."""
    spans = [(s, s + len(word)) for word in set(words) for s in word_starts(text, word)]
    positions = span_tokens(model.token_offsets(text), spans)
    if not positions:
        raise UsageError(
            f"gaussian corruption: no subject tokens found in {text!r} for {list(words)}; "
            "this task or dataset defines no subject words, use --corruption str"
        )
    return positions


def gaussian_noise(seed: int, prompt_idx: int, shape: tuple[int, ...], std: float) -> torch.Tensor:
    """The noise of one prompt, drawn from its own generator."""
    import torch

    gen = torch.Generator().manual_seed(seed * 1_000_003 + prompt_idx)
    return torch.randn(shape, generator=gen) * std
