"""The task interface: seeded generators of clean/corrupted prompt pairs, checked by tokenizer."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

from actstore.core.errors import UsageError


@dataclass(frozen=True)
class RoleSpan:
    """Where a role sits in the clean prompt: a character span (its token is the last one the
    span touches, so a multi-token word's role is its last token) `shift` tokens on (IOI's S1+1),
    or a token position given as it is (`pos`, BOS = 0; dataset files)."""

    name: str
    start: int = 0
    end: int = 0
    shift: int = 0
    pos: int | None = None


@dataclass(frozen=True)
class PromptPair:
    """One clean/corrupted pair.

    `answer` and `wrong_answer` are the text that continues the prompt (" Mary" for GPT-2's BPE,
    "Mary" for a word-level tokenizer): each must be exactly one token. `answers` and
    `wrong_answers`, when given, are the full correct and incorrect answer sets (Greater-Than:
    every year above the start year, and every year at or below it), holding `answer` and
    `wrong_answer`; empty means the set of that one answer. `subject_words` are the
    words of the clean prompt whose tokens Gaussian noising corrupts. `group` labels the pair
    (template, class) for per-group analysis such as class means. `roles` name token positions
    of the clean prompt (IOI's IO, S1, S2; END is always added by ingest), in the task's order.
    """

    clean: str
    corrupted: str
    answer: str
    wrong_answer: str
    subject_words: tuple[str, ...] = ()
    group: str = ""
    meta: dict = field(default_factory=dict, compare=False, hash=False)
    answers: tuple[str, ...] = ()
    wrong_answers: tuple[str, ...] = ()
    roles: tuple[RoleSpan, ...] = ()

    def correct(self) -> tuple[str, ...]:
        """The correct answer set."""
        return self.answers or (self.answer,)

    def incorrect(self) -> tuple[str, ...]:
        """The incorrect answer set."""
        return self.wrong_answers or (self.wrong_answer,)


class Tokenizes(Protocol):
    """What a task needs from a model: its tokenizer, seen through the adapter."""

    def token_ids(self, text: str) -> list[int]: ...

    def token_offsets(self, text: str) -> list[tuple[int, int]]: ...

    @property
    def tokenizer(self): ...


class Task(Protocol):
    """A named generator of prompt pairs."""

    name: str
    description: str
    roles: dict[str, str]  # each role's name and what it is, in order, END last

    def generate(self, n: int, seed: int, model: Tokenizes) -> list[PromptPair]: ...


class TaskValidationError(UsageError):
    """A pair that the model's tokenizer cannot use as it stands."""


def is_word_level(model: Tokenizes) -> bool:
    """True for the toy models' word-level tokenizer (answers carry no leading space)."""
    tok = model.tokenizer
    backend = getattr(tok, "backend_tokenizer", None)
    if backend is not None:  # a fast lookup: get_vocab() copies the whole vocabulary
        return backend.token_to_id("<|unk|>") is not None
    return "<|unk|>" in tok.get_vocab()


def answer_text(word: str, model: Tokenizes) -> str:
    """How `word` continues a prompt for this tokenizer: a leading space for BPE."""
    return word if is_word_level(model) else " " + word


def clip(text: str, width: int = 120) -> str:
    """Text short enough to quote in a one-line error message."""
    return text if len(text) <= width else text[: width - 1] + "…"


def validate_pairs(
    pairs: Sequence[PromptPair],
    model: Tokenizes,
    source: str,
    labels: Sequence[str] | None = None,
) -> None:
    """Raise on the first pair the tokenizer cannot take as it is; never drop or pad silently.

    `labels[i]` names pair i in the message (e.g. "row 7" of a file); "pair i" by default.
    """
    answer_ids: dict[str, list[int]] = {}
    for i, p in enumerate(pairs):
        where = f"{source} {labels[i] if labels is not None else f'pair {i}'}"
        clean_ids = model.token_ids(p.clean)
        corrupted_ids = model.token_ids(p.corrupted)
        if len(clean_ids) != len(corrupted_ids):
            raise TaskValidationError(
                f"{where}: clean and corrupted differ in token length "
                f"({len(clean_ids)} vs {len(corrupted_ids)}): {clip(p.clean)!r} / "
                f"{clip(p.corrupted)!r}; "
                "use same-length replacements"
            )
        answers = [("answer", a) for a in dict.fromkeys((p.answer, *p.correct()))]
        answers += [("wrong answer", a) for a in dict.fromkeys((p.wrong_answer, *p.incorrect()))]
        for label, text in answers:
            if text not in answer_ids:  # answer sets repeat across pairs: tokenize each once
                answer_ids[text] = model.token_ids(text)
            ids = answer_ids[text]
            if len(ids) != 1:
                raise TaskValidationError(
                    f"{where}: {label} {clip(text)!r} is {len(ids)} tokens, must be exactly 1 "
                    f"(prompt {clip(p.clean)!r}); choose single-token answers"
                )
        _check_sets(p, where)
        unk = getattr(model.tokenizer, "unk_token_id", None)
        if unk is not None and is_word_level(model):
            for text in (p.clean, p.corrupted, *(a for _, a in answers)):
                if unk in (answer_ids.get(text) or model.token_ids(text)):
                    raise TaskValidationError(
                        f"{where}: {clip(text)!r} has words outside the model's vocabulary; "
                        "use a model whose tokenizer covers the task"
                    )


def _check_sets(p: PromptPair, where: str) -> None:
    """Answer sets that a metric can use: the representatives in them, nothing in both."""
    if p.answer not in p.correct() or p.wrong_answer not in p.incorrect():
        raise TaskValidationError(
            f"{where}: the answer sets must hold the answer {p.answer!r} and the wrong answer "
            f"{p.wrong_answer!r}; add them to answers / wrong_answers"
        )
    both = sorted(set(p.correct()) & set(p.incorrect()))
    if both:
        raise TaskValidationError(
            f"{where}: {both[0]!r} is both a correct and an incorrect answer; give disjoint sets"
        )


def rng_for(seed: int, name: str) -> random.Random:
    """A task's own random stream, so that tasks never share or disturb each other's draws."""
    return random.Random(f"{name}:{seed}")


class TokenizerView:
    """A bare tokenizer seen as `Tokenizes`: for generating and validating without a model."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer

    def token_ids(self, text: str) -> list[int]:
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [tuple(o) for o in enc["offset_mapping"]]


def n_tokens(text: str, model: Tokenizes) -> int:
    """How many tokens `text` takes where it continues a prompt."""
    return len(model.token_ids(text))


def single_token(words: Sequence[str], model: Tokenizes, task: str, least: int = 2) -> list[str]:
    """The words of a pool that are one token as answers for this tokenizer.

    A pool is chosen so that every word is one token for GPT-2's BPE and the toy vocabulary; for
    another tokenizer the pool shrinks to the words that are. Too few left is an error, not a
    silent change of the task.
    """
    kept = [w for w in words if n_tokens(answer_text(w, model), model) == 1]
    if len(kept) < least:
        raise TaskValidationError(
            f"task {task}: only {len(kept)} of the words {list(words)[:6]}... are single tokens "
            f"for this tokenizer (need {least}); use a model whose tokenizer fits the task"
        )
    return kept


def fill(template: str, **values: str) -> tuple[str, dict[str, list[tuple[int, int]]]]:
    """`template.format(**values)` and the character span of every placeholder it filled, per
    placeholder name in order of appearance: where a task's role words are, found by
    construction rather than by searching the text (a year "17 17" has two equal words)."""
    import string

    parts: list[str] = []
    spans: dict[str, list[tuple[int, int]]] = {}
    at = 0
    for literal, name, _spec, _conv in string.Formatter().parse(template):
        parts.append(literal)
        at += len(literal)
        if name is not None:
            value = str(values[name])
            spans.setdefault(name, []).append((at, at + len(value)))
            parts.append(value)
            at += len(value)
    return "".join(parts), spans


def role(name: str, span: tuple[int, int], shift: int = 0) -> RoleSpan:
    """A role at a character span of the clean prompt (`fill`'s spans)."""
    return RoleSpan(name, span[0], span[1], shift)


def span_tokens(offsets: Sequence[tuple[int, int]], spans: Sequence[tuple[int, int]]) -> list[int]:
    """Input positions (BOS = 0, so token i of the text is position i + 1) of every token whose
    character offsets overlap one of `spans`."""
    return [i + 1 for i, (a, b) in enumerate(offsets) if any(a < e and b > s for s, e in spans)]


def word_starts(text: str, word: str) -> list[int]:
    """Where `word` occurs in `text` as a whole word (not inside a longer one)."""
    found = []
    start = text.find(word)
    while start != -1:
        end = start + len(word)
        before_ok = start == 0 or not text[start - 1].isalnum()
        after_ok = end == len(text) or not text[end].isalnum()
        if before_ok and after_ok:
            found.append(start)
        start = text.find(word, start + 1)
    return found


def template_words(*templates: str) -> list[str]:
    """The literal words of templates, placeholders left out (for the toy vocabulary)."""
    import string

    words: list[str] = []
    for t in templates:
        for literal, _field, _spec, _conv in string.Formatter().parse(t):
            words.extend(literal.split())
    return words
