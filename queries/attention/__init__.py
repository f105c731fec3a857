"""Attention by role: where heads attend from one role's token to others' (`actstore attention`)."""

from queries.attention.attend import attention, attention_patterns
from queries.attention.heads import head_scores

__all__ = ["attention", "attention_patterns", "head_scores"]
