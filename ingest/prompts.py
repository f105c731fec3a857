"""A run's prompt pairs, from a task or a dataset file, tokenized and padded once, and the
`prompts` rows they become: shared by the ingest runner, shards and repair (which regenerates a
run's prompts from its recorded parameters).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from actstore.core.errors import UsageError
from actstore.model.adapter import ModelAdapter
from ingest.corruptions import subject_positions
from ingest.tasks import PromptPair, get_task, validate_pairs
from ingest.tasks.base import Tokenizes, clip, span_tokens

END = "END"

DEFAULT_N = 64


@dataclass
class Prepared:
    """Everything an ingest needs, computed before the store is touched."""

    pairs: list[PromptPair]
    clean: np.ndarray  # (n, seq) int32, right-padded
    corrupted: np.ndarray
    lengths: np.ndarray  # (n,) real token counts, BOS included
    answers: np.ndarray  # (n,) token ids
    wrong: np.ndarray
    answer_sets: list[list[int]]  # per prompt, the correct answer set's token ids
    wrong_sets: list[list[int]]
    subjects: list[list[int]]  # per prompt, positions Gaussian noising touches
    roles: list[dict[str, int]]  # per prompt, each role's input position (END included)
    texts: list[list[str]]  # per prompt, each clean token's text decoded alone (labels)


def load_pairs(
    model: ModelAdapter, task: str | None, dataset: str | None, n: int | None, seed: int
) -> tuple[str, list[PromptPair], dict]:
    """The run's name, its prompt pairs, and what identifies a dataset file's contents."""
    if dataset is not None:
        from ingest.datasets import load_dataset

        path = Path(dataset)
        if not path.is_file():
            raise UsageError(f"--dataset {dataset}: no such file")
        pairs = load_dataset(path, model)
        if n is not None:
            pairs = pairs[:n]
        digest = hashlib.sha256(path.read_bytes()).hexdigest()[:16]
        source = {"dataset": str(path.resolve()), "dataset_sha256": digest}
        name = task or path.stem
        validate_pairs(pairs, model, source=str(path))
        return name, pairs, source
    if task is None:
        raise UsageError("give --task NAME or --dataset FILE")
    generator = get_task(task)
    pairs = generator.generate(n if n is not None else DEFAULT_N, seed, model)
    validate_pairs(pairs, model, source=f"task {task}")
    return task, pairs, {}


def prepare(model: ModelAdapter, pairs: list[PromptPair], corruption: str) -> Prepared:
    """Tokenize every pair once; refuse prompts longer than the model's context."""
    n = len(pairs)
    clean_ids = [model.tokenize(p.clean) for p in pairs]
    corrupted_ids = (
        clean_ids if corruption == "gaussian" else [model.tokenize(p.corrupted) for p in pairs]
    )
    lengths = np.array([len(t) for t in clean_ids], dtype=np.int32)
    seq = int(lengths.max())
    if seq > model.shape.n_ctx:
        raise UsageError(
            f"prompts are up to {seq} tokens but the model's context is {model.shape.n_ctx}; "
            "use shorter prompts"
        )
    clean = np.full((n, seq), model.pad_id, dtype=np.int32)
    corrupted = np.full((n, seq), model.pad_id, dtype=np.int32)
    for i, (c, k) in enumerate(zip(clean_ids, corrupted_ids, strict=True)):
        clean[i, : len(c)] = c
        corrupted[i, : len(k)] = k
    answers = np.array([model.token_ids(p.answer)[0] for p in pairs], dtype=np.int32)
    wrong = np.array([model.token_ids(p.wrong_answer)[0] for p in pairs], dtype=np.int32)
    ids: dict[str, int] = {}  # answer sets repeat across pairs: tokenize each answer once
    for a in {a for p in pairs for a in (*p.correct(), *p.incorrect())}:
        ids[a] = model.token_ids(a)[0]
    answer_sets = [[ids[a] for a in p.correct()] for p in pairs]
    wrong_sets = [[ids[a] for a in p.incorrect()] for p in pairs]
    subjects = (
        [subject_positions(model, p.clean, p.subject_words) for p in pairs]
        if corruption == "gaussian"
        else [[] for _ in pairs]
    )
    roles = [role_positions(model, p, int(k)) for p, k in zip(pairs, lengths, strict=True)]
    words = {t: model.tokenizer.decode([t]) for t in {t for ids in clean_ids for t in ids}}
    texts = [[words[t] for t in ids] for ids in clean_ids]
    return Prepared(pairs, clean, corrupted, lengths, answers, wrong, answer_sets, wrong_sets,
                    subjects, roles, texts)  # fmt: skip


def role_positions(model: Tokenizes, pair: PromptPair, length: int) -> dict[str, int]:
    """Each role's position in the model's input (BOS = 0) for a prompt of `length` tokens:
    a span's last token, plus its shift; END, the final token, always."""
    found: dict[str, int] = {}
    offsets = model.token_offsets(pair.clean) if any(r.pos is None for r in pair.roles) else []
    for r in pair.roles:
        if r.pos is not None:
            pos = r.pos
        else:
            tokens = span_tokens(offsets, [(r.start, r.end)])
            if not tokens:
                raise UsageError(
                    f"role {r.name}: no token of {clip(pair.clean)!r} covers characters "
                    f"{r.start}..{r.end}; give the role a word of the prompt"
                )
            pos = tokens[-1] + r.shift
        if not 0 <= pos < length:
            raise UsageError(
                f"role {r.name} is at position {pos}, outside the prompt's {length} tokens "
                f"(BOS = 0): {clip(pair.clean)!r}; give a position below {length}"
            )
        found[r.name] = pos
    if found.get(END, length - 1) != length - 1:
        raise UsageError(
            f"role END is the final token ({length - 1}) of {clip(pair.clean)!r}, not "
            f"{found[END]}; leave END out (it is always added)"
        )
    found[END] = length - 1
    return found


def role_summary(prep: Prepared) -> dict[str, Any]:
    """What a run's parameters record of its roles: their names in the task's order (END last)
    and a digest of every prompt's positions, so that runs whose roles differ never share an id."""
    names = list(dict.fromkeys(r for roles in prep.roles for r in roles if r != END)) + [END]
    digest = hashlib.sha256(
        json.dumps([sorted(roles.items()) for roles in prep.roles]).encode()
    ).hexdigest()[:16]
    return {"names": names, "sha256": digest}


def prompt_records(prep: Prepared, lo: int, hi: int, metrics: dict) -> list[dict[str, Any]]:
    """The `prompts` rows of prompts [lo, hi), keyed by column, without the run id: what both
    the ingest runner and a shard's manifest record."""
    records = []
    for j, i in enumerate(range(lo, hi)):
        pair, length = prep.pairs[i], int(prep.lengths[i])
        records.append(
            {
                "prompt_idx": i,
                "clean_text": pair.clean,
                "corrupted_text": pair.corrupted,
                "answer": pair.answer,
                "wrong_answer": pair.wrong_answer,
                **{name: float(values[j]) for name, values in metrics.items()},
                "answer_token": int(prep.answers[i]),
                "wrong_answer_token": int(prep.wrong[i]),
                "seq_len": length,
                "clean_tokens": prep.clean[i, :length].tolist(),
                "clean_token_texts": prep.texts[i],
                "corrupted_tokens": prep.corrupted[i, :length].tolist(),
                "grp": pair.group,
                "answers": list(pair.correct()),
                "wrong_answers": list(pair.incorrect()),
                "answer_tokens": prep.answer_sets[i],
                "wrong_answer_tokens": prep.wrong_sets[i],
                "roles": prep.roles[i],
            }
        )
    return records
