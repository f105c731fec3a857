"""Tokenizers built in code for the tests: the toy word-level one and a tiny GPT-2-style BPE."""

from __future__ import annotations

from functools import lru_cache

from ingest.tasks.base import TokenizerView

EXTRA_NATURAL_WORDS = ["What", "color", "Answer", "lasted", "year"]


@lru_cache(maxsize=1)
def toy_view() -> TokenizerView:
    from tools.train_toy import toy_tokenizer

    return TokenizerView(toy_tokenizer())


@lru_cache(maxsize=1)
def bpe_view() -> TokenizerView:
    """A byte-level BPE like GPT-2's: " word" is one token for every task word, years split as
    " 17" + "32", other words fall apart into pieces (so multi-token answers exist)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    from ingest.tasks import toy_vocabulary

    byte_chars = sorted(set(pre_tokenizers.ByteLevel.alphabet()))
    vocab = {"<|endoftext|>": 0}
    for ch in byte_chars:
        vocab.setdefault(ch, len(vocab))
    merges: list[tuple[str, str]] = []

    def add(token: str, merge: bool = False) -> None:
        for k in range(2, len(token) + 1):
            if token[:k] not in vocab:
                vocab[token[:k]] = len(vocab)
                if merge:
                    merges.append((token[: k - 1], token[k - 1]))

    # Whole words come straight from the vocabulary (ignore_merges); only numbers use merges,
    # centuries first (a lower rank wins), so " 1732" -> " 17" + "32" as in GPT-2.
    for c in range(11, 18):
        add(f"Ġ{c}", merge=True)
    for y in range(100):
        add(f"{y:02d}", merge=True)
    for w in toy_vocabulary() + EXTRA_NATURAL_WORDS:
        if w.isalpha():
            add("Ġ" + w)
            add(w)
    tk = Tokenizer(models.BPE(vocab=vocab, merges=merges, ignore_merges=True))
    tk.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tk.decoder = decoders.ByteLevel()
    tok = PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token="<|endoftext|>",
        eos_token="<|endoftext|>",
        name_or_path="tiny-bpe",
    )
    return TokenizerView(tok)
