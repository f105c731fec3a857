"""The word-level tokenizer of the built-in toy models, built offline from a word list."""

from __future__ import annotations

from pathlib import Path

SPECIAL_TOKENS = ["<|bos|>", "<|pad|>", "<|unk|>"]


def word_level_tokenizer(words: list[str], name: str = "toy"):
    """A PreTrainedTokenizerFast over `words` that TransformerBridge accepts without the hub.

    The bridge requires `name_or_path` and `add_bos_token=True` to accept a tokenizer.
    """
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {}
    for w in SPECIAL_TOKENS + list(words):
        vocab.setdefault(w, len(vocab))
    tk = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<|unk|>"))
    tk.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|bos|>",
        eos_token="<|bos|>",
        pad_token="<|pad|>",
        unk_token="<|unk|>",
        name_or_path=name,
        add_bos_token=True,
    )


def read_vocab(path: Path) -> list[str]:
    """Words of a vocab.json (a JSON list, special tokens first)."""
    import json

    return list(json.loads(Path(path).read_text()))
