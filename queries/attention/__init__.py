"""Attention by role: where heads attend from one role's token to others' (`actstore attention`)."""

from queries.attention.heads import head_scores
from queries.attention.query import attention, attention_patterns

__all__ = ["attention", "attention_patterns", "head_scores"]
