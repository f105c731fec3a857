"""Importers for prompt-pair datasets from other circuit-discovery tools.

- EAP-IG CSV (Hanna et al.'s EAP-IG repository): columns `clean`, `corrupted`, and either
  `correct_idx` / `incorrect_idx` (token ids in the model's vocabulary: one id, or a list such as
  `[1012, 1013]` for an answer set) or text columns `answer` / `wrong_answer` (text wins where
  both are present).
- AutoCircuit JSON: `{"prompts": [{"clean", "corrupt", "answers", "wrong_answers"}, ...]}`,
  answers as lists of strings: the correct and incorrect answer sets, the first of each its
  representative (`answer`, `wrong_answer`).

Both may name token roles (optional: a `roles` column of the CSV, a `roles` key of a JSON
prompt): a JSON object from role name to either a token position in the model's input (BOS = 0)
or a word of the clean prompt (its first whole-word occurrence; a multi-token word's role is its
last token), e.g. `{"IO": 2, "S1": "John", "S2": 10}`. END, the final token, is always added.

`load_dataset(path, model)` picks the format by extension (.csv, .json), and every malformed
row is a one-line `UsageError` naming the file, the row and the problem. Every pair is checked
against the model's tokenizer (equal token length, single-token answers), never dropped.
`check_dataset_file(path)` makes every check that needs no model, before torch is imported.
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from actstore.core.errors import UsageError
from ingest.tasks.base import (
    PromptPair,
    RoleSpan,
    Tokenizes,
    clip,
    validate_pairs,
    word_starts,
)


def load_dataset(path: str | Path, model: Tokenizes) -> list[PromptPair]:
    """The prompt pairs of an EAP-IG CSV or AutoCircuit JSON file, validated for `model`."""
    path = Path(path)
    pairs, labels = _read(path, model)
    validate_pairs(pairs, model, path.name, labels=labels)
    return pairs


def check_dataset_file(path: str | Path) -> None:
    """Every check of a dataset file that needs no tokenizer: its format, structure, rows."""
    _read(Path(path), None)


def _read(path: Path, model: Tokenizes | None) -> tuple[list[PromptPair], list[str]]:
    if not path.is_file():
        raise UsageError(f"--dataset {path}: no such file")
    suffix = path.suffix.lower()
    if suffix == ".csv":
        pairs, labels = _read_eap_csv(path, model)
    elif suffix == ".json":
        pairs, labels = _read_autocircuit_json(path)
    else:
        raise UsageError(
            f"--dataset {path}: unknown format {suffix or '(no extension)'!r}; "
            "give an EAP-IG .csv or an AutoCircuit .json file"
        )
    if not pairs:
        raise UsageError(f"--dataset {path}: the file holds no prompt pairs")
    return pairs, labels


def differing_words(clean: str, corrupted: str) -> tuple[str, ...]:
    """Words of `clean` that the corrupted prompt replaces: the subject words of a dataset pair."""
    a, b = clean.split(), corrupted.split()
    if len(a) != len(b):
        return ()
    strip = ".,;:!?\"'()"
    return tuple(
        dict.fromkeys(
            x.strip(strip) for x, y in zip(a, b, strict=True) if x != y and x.strip(strip)
        )
    )


def _text(value: object, where: str, column: str) -> str:
    if not isinstance(value, str) or not value.strip():
        raise UsageError(f"{where}: {column!r} is empty or not text")
    return value


def _read_eap_csv(path: Path, model: Tokenizes | None) -> tuple[list[PromptPair], list[str]]:
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = set(reader.fieldnames or [])
            if not columns:
                raise UsageError(f"--dataset {path}: empty file (no header row)")
            _check_columns(path, columns)
            pairs, labels = [], []
            for n, row in enumerate(reader, start=1):
                where = f"--dataset {path.name} row {n} (line {reader.line_num})"
                pairs.append(_eap_row(row, where, model))
                labels.append(f"row {n}")
    except UnicodeDecodeError:
        raise UsageError(f"--dataset {path}: not UTF-8 text") from None
    except csv.Error as exc:
        raise UsageError(f"--dataset {path}: malformed CSV: {exc}") from None
    return pairs, labels


def _check_columns(path: Path, columns: set[str]) -> None:
    missing = [c for c in ("clean", "corrupted") if c not in columns]
    has_text = {"answer", "wrong_answer"} <= columns
    has_idx = {"correct_idx", "incorrect_idx"} <= columns
    if not (has_text or has_idx):
        missing.append("correct_idx+incorrect_idx (or answer+wrong_answer)")
    if missing:
        raise UsageError(
            f"--dataset {path.name}: missing column(s) {', '.join(missing)}; an EAP-IG CSV has "
            "clean, corrupted and correct_idx, incorrect_idx (token ids) or answer, wrong_answer"
        )


def _eap_row(row: dict, where: str, model: Tokenizes | None) -> PromptPair:
    if None in row:
        raise UsageError(f"{where}: more fields than the header has columns")
    if any(v is None for v in row.values()):
        raise UsageError(f"{where}: fewer fields than the header has columns")
    clean = _text(row["clean"], where, "clean")
    corrupted = _text(row["corrupted"], where, "corrupted")
    meta: dict = {"source_format": "eap-ig-csv"}
    answers: tuple[str, ...] = ()
    wrong_answers: tuple[str, ...] = ()
    if row.get("answer") and row.get("wrong_answer"):
        answer, wrong = row["answer"], row["wrong_answer"]
    else:
        answers = _token_texts(row.get("correct_idx"), where, "correct_idx", model)
        wrong_answers = _token_texts(row.get("incorrect_idx"), where, "incorrect_idx", model)
        answer, wrong = answers[0], wrong_answers[0]
    return PromptPair(
        clean=clean,
        corrupted=corrupted,
        answer=answer,
        wrong_answer=wrong,
        subject_words=differing_words(clean, corrupted),
        group="dataset",
        meta=meta,
        answers=answers,
        wrong_answers=wrong_answers,
        roles=_roles(row.get("roles"), where, clean),
    )


def _token_texts(
    value: str | None, where: str, column: str, model: Tokenizes | None
) -> tuple[str, ...]:
    """The texts of the token ids in `value` (one id, or a [id, ...] list); without a model the
    ids are only checked to be integers (texts are then empty)."""
    if value is None or not value.strip():
        raise UsageError(f"{where}: {column} is empty")
    text = value.strip()
    if text.startswith("["):
        try:
            ids = json.loads(text)
        except (json.JSONDecodeError, RecursionError):
            ids = None
        if not isinstance(ids, list) or not ids:
            raise UsageError(
                f"{where}: {column} {clip(value)!r} is not a non-empty list of token ids like "
                "[12, 34]"
            )
    else:
        ids = [text]
    return tuple(_token_text(str(i), where, column, model) for i in ids)


def _token_text(value: str, where: str, column: str, model: Tokenizes | None) -> str:
    """The text of token id `value`, checked to re-encode as exactly that one token (without a
    model: only checked to be an integer)."""
    if len(value.strip()) > 12 or not value.strip().lstrip("-").isdigit():
        raise UsageError(f"{where}: {column} {clip(value)!r} is not an integer token id")
    idx = int(value.strip())
    if model is None:
        return ""
    tok = model.tokenizer
    size = len(tok)
    if not 0 <= idx < size:
        raise UsageError(f"{where}: {column} {idx} is outside the vocabulary (0..{size - 1})")
    text = tok.decode([idx])
    if model.token_ids(text) != [idx]:
        raise UsageError(
            f"{where}: {column} {idx} decodes to {text!r}, which does not encode back to that "
            "single token; give answer/wrong_answer text columns instead"
        )
    return text


def _read_autocircuit_json(path: Path) -> tuple[list[PromptPair], list[str]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except UnicodeDecodeError:
        raise UsageError(f"--dataset {path}: not UTF-8 text") from None
    except json.JSONDecodeError as exc:
        raise UsageError(
            f"--dataset {path}: bad JSON at line {exc.lineno} column {exc.colno}: {exc.msg}"
        ) from None
    except RecursionError:
        raise UsageError(
            f"--dataset {path}: JSON nested too deeply to read; an AutoCircuit file is an object "
            "with a flat 'prompts' list"
        ) from None
    except ValueError as exc:  # e.g. an integer literal longer than Python converts
        raise UsageError(f"--dataset {path}: unreadable JSON value: {clip(str(exc))}") from None
    if not isinstance(data, dict) or not isinstance(data.get("prompts"), list):
        raise UsageError(
            f"--dataset {path.name}: an AutoCircuit JSON file is an object with a 'prompts' list"
        )
    pairs, labels = [], []
    for n, item in enumerate(data["prompts"], start=1):
        where = f"--dataset {path.name} prompt {n}"
        if not isinstance(item, dict):
            raise UsageError(f"{where}: not an object")
        missing = [k for k in ("clean", "corrupt", "answers", "wrong_answers") if k not in item]
        if missing:
            raise UsageError(f"{where}: missing key(s) {', '.join(missing)}")
        answers = _answers(item["answers"], where, "answers")
        wrong = _answers(item["wrong_answers"], where, "wrong_answers")
        clean = _text(item["clean"], where, "clean")
        corrupted = _text(item["corrupt"], where, "corrupt")
        pairs.append(
            PromptPair(
                clean=clean,
                corrupted=corrupted,
                answer=answers[0],
                wrong_answer=wrong[0],
                subject_words=differing_words(clean, corrupted),
                group="dataset",
                meta={"source_format": "autocircuit-json"},
                answers=tuple(dict.fromkeys(answers)),
                wrong_answers=tuple(dict.fromkeys(wrong)),
                roles=_roles(item.get("roles"), where, clean),
            )
        )
        labels.append(f"prompt {n}")
    return pairs, labels


def _answers(value: object, where: str, key: str) -> list[str]:
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, list) or not value:
        raise UsageError(f"{where}: {key!r} must be a non-empty list of strings")
    for a in value:
        if not isinstance(a, str) or not a:
            raise UsageError(f"{where}: {key!r} holds {clip(repr(a))}, not a non-empty string")
    return list(value)


def _roles(value: object, where: str, clean: str) -> tuple[RoleSpan, ...]:
    """A row's roles: absent or empty is none; else a JSON object (text, in a CSV cell) from
    role name to a token position or a word of the clean prompt."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return ()
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except (json.JSONDecodeError, RecursionError, ValueError):
            value = None
    if not isinstance(value, dict):
        raise UsageError(
            f'{where}: roles must be a JSON object like {{"IO": 2, "S1": "John"}} (role name to '
            "token position or word of the clean prompt)"
        )
    spans = []
    for name, at in value.items():
        if not name or not name.strip() or "," in name or name.strip().isdigit():
            raise UsageError(
                f"{where}: role name {clip(repr(name))} must be non-empty text, not a number, "
                "without commas"
            )
        if isinstance(at, bool) or not isinstance(at, (int, str)) or at == "":
            raise UsageError(
                f"{where}: role {name!r} is {clip(repr(at))}; give a token position (BOS = 0) "
                "or a word of the clean prompt"
            )
        if isinstance(at, int):
            if not 0 <= at < 1_000_000:
                raise UsageError(f"{where}: role {name!r} position {at} is not a token position")
            spans.append(RoleSpan(name, pos=at))
            continue
        starts = word_starts(clean, at)
        if not starts:
            raise UsageError(
                f"{where}: role {name!r} names {clip(repr(at))}, which is not a word of the "
                f"clean prompt {clip(clean)!r}"
            )
        spans.append(RoleSpan(name, starts[0], starts[0] + len(at)))
    return tuple(spans)
