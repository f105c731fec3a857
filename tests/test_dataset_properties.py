"""Property-based tests of the dataset importers against their documented formats.

EAP-IG CSV: columns clean, corrupted, correct_idx, incorrect_idx (token ids). AutoCircuit JSON:
{"prompts": [{"clean", "corrupt", "answers", "wrong_answers"}]}.
"""

from __future__ import annotations

import csv
import json
import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from actstore.core.errors import UsageError
from ingest import datasets

SETTINGS = settings(max_examples=25, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow])  # fmt: skip


@pytest.fixture(scope="module")
def words(toy_random) -> list[str]:
    """Plain words of the toy vocabulary: each is exactly one token."""
    vocab = toy_random.tokenizer.get_vocab()
    out = sorted(w for w in vocab if w.isalpha() and toy_random.token_ids(w) == [vocab[w]])
    assert len(out) > 20
    return out


def pair_lists(words: list[str]):
    """Lists of valid pairs: equal word counts, single-word answers, the wrong answer not the
    answer (a prompt whose answer is also its wrong answer is refused)."""

    @st.composite
    def pair(draw):
        length = draw(st.integers(1, 8))
        clean = draw(st.lists(st.sampled_from(words), min_size=length, max_size=length))
        corrupted = draw(st.lists(st.sampled_from(words), min_size=length, max_size=length))
        answer = draw(st.sampled_from(words))
        wrong = draw(st.sampled_from([w for w in words if w != answer]))
        return " ".join(clean), " ".join(corrupted), answer, wrong

    return st.lists(pair(), min_size=1, max_size=6)


def write_csv(path: Path, model, pairs) -> Path:
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["clean", "corrupted", "correct_idx", "incorrect_idx"])
        for clean, corrupted, a, b in pairs:
            w.writerow([clean, corrupted, model.token_ids(a)[0], model.token_ids(b)[0]])
    return path


def write_json(path: Path, pairs) -> Path:
    prompts = [{"clean": c, "corrupt": k, "answers": [a], "wrong_answers": [b]}
               for c, k, a, b in pairs]  # fmt: skip
    path.write_text(json.dumps({"prompts": prompts}))
    return path


def loaded(pairs) -> list[tuple[str, str, str, str]]:
    return [(p.clean, p.corrupted, p.answer, p.wrong_answer) for p in pairs]


def test_csv_and_json_round_trip_in_order(toy_random, words):
    @SETTINGS
    @given(pair_lists(words))
    def check(pairs):
        with tempfile.TemporaryDirectory() as d:
            from_csv = datasets.load_dataset(write_csv(Path(d) / "p.csv", toy_random, pairs),
                                             toy_random)  # fmt: skip
            from_json = datasets.load_dataset(write_json(Path(d) / "p.json", pairs), toy_random)
        assert loaded(from_csv) == pairs
        assert loaded(from_json) == pairs

    check()


def test_a_broken_row_is_named_one_line_never_dropped(toy_random, words):
    @SETTINGS
    @given(pair_lists(words), st.data())
    def check(pairs, data):
        k = data.draw(st.integers(0, len(pairs) - 1))
        how = data.draw(st.sampled_from(["length", "answer", "missing"]))
        clean, corrupted, a, b = pairs[k]
        broken = list(pairs)
        if how == "length":
            broken[k] = (clean, corrupted + " " + a, a, b)
        elif how == "answer":
            broken[k] = (clean, corrupted, a + " " + b, b)
        with tempfile.TemporaryDirectory() as d:
            path = write_json(Path(d) / "p.json", broken)
            if how == "missing":
                doc = json.loads(path.read_text())
                del doc["prompts"][k]["corrupt"]
                path.write_text(json.dumps(doc))
            with pytest.raises(UsageError) as err:
                datasets.load_dataset(path, toy_random)
        message = str(err.value)
        assert "\n" not in message and "p.json" in message
        assert f"prompt {k + 1}" in message, message

    check()


def test_arbitrary_text_is_a_usage_error_or_valid_pairs(toy_random):
    @SETTINGS
    @given(st.text(max_size=200), st.sampled_from([".csv", ".json"]))
    def check(text, suffix):
        with tempfile.TemporaryDirectory() as d:
            path = Path(d) / f"f{suffix}"
            path.write_text(text)
            try:
                pairs = datasets.load_dataset(path, toy_random)
            except UsageError as exc:
                assert "\n" not in str(exc)
            else:
                assert pairs  # an empty file is an error, never an empty ingest

    check()
