"""EAP-IG CSV and AutoCircuit JSON importers: round trips, and one-line errors naming the row."""

from __future__ import annotations

import csv
import json

import pytest
from tokenizers_for_tests import bpe_view, toy_view

from actstore.core.errors import UsageError
from ingest.datasets import load_dataset
from ingest.tasks import TaskValidationError, get_task

HEADER = ["clean", "corrupted", "correct_idx", "incorrect_idx"]
GOOD = ("The capital of France is", "The capital of Japan is")


def _write_csv(path, rows, header):
    with path.open("w", newline="") as f:
        w = csv.writer(f)
        w.writerow(header)
        w.writerows(rows)
    return path


@pytest.mark.parametrize("view", [toy_view, bpe_view])
def test_eap_ig_csv_round_trip_with_token_ids(tmp_path, view):
    model = view()
    pairs = get_task("ioi").generate(5, 0, model)
    rows = [
        (p.clean, p.corrupted, model.token_ids(p.answer)[0], model.token_ids(p.wrong_answer)[0])
        for p in pairs
    ]
    path = _write_csv(
        tmp_path / "ioi.csv", rows, ["clean", "corrupted", "correct_idx", "incorrect_idx"]
    )
    loaded = load_dataset(path, model)
    assert [(p.clean, p.corrupted, p.answer, p.wrong_answer) for p in loaded] == [
        (p.clean, p.corrupted, p.answer, p.wrong_answer) for p in pairs
    ]
    assert loaded[0].correct() == (pairs[0].answer,) and loaded[0].meta["source_format"]
    # the words the corruption replaced become the subject words (Gaussian noising targets)
    assert set(loaded[0].subject_words) <= set(pairs[0].clean.replace(",", " ").split())
    assert loaded[0].subject_words


def test_eap_ig_csv_with_text_answers(tmp_path):
    model = toy_view()
    pairs = get_task("sva").generate(4, 1, model)
    rows = [(p.clean, p.corrupted, p.answer, p.wrong_answer) for p in pairs]
    path = _write_csv(tmp_path / "sva.csv", rows, ["clean", "corrupted", "answer", "wrong_answer"])
    assert [p.answer for p in load_dataset(path, model)] == [p.answer for p in pairs]


def test_autocircuit_json_round_trip(tmp_path):
    model = toy_view()
    pairs = get_task("capital-country").generate(4, 2, model)
    prompts = [
        {
            "clean": p.clean,
            "corrupt": p.corrupted,
            "answers": [p.answer],
            "wrong_answers": [p.wrong_answer],
        }
        for p in pairs
    ]
    prompts[1]["answers"].append("Rome")
    path = tmp_path / "cc.json"
    path.write_text(json.dumps({"prompts": prompts}))
    loaded = load_dataset(path, model)
    assert [(p.clean, p.corrupted, p.answer, p.wrong_answer) for p in loaded] == [
        (p.clean, p.corrupted, p.answer, p.wrong_answer) for p in pairs
    ]
    assert loaded[1].correct() == (pairs[1].answer, "Rome")
    assert loaded[1].incorrect() == (pairs[1].wrong_answer,)
    assert loaded[0].subject_words == (pairs[0].meta["country"],)


def test_eap_ig_csv_answer_sets_as_id_lists(tmp_path):
    """Greater-Than as an EAP-IG CSV with answer sets: lists of token ids in the idx columns."""
    model = toy_view()
    pairs = get_task("greater-than").generate(3, 0, model)

    def ids(words):
        return json.dumps([model.token_ids(w)[0] for w in words])

    rows = [(p.clean, p.corrupted, ids(p.correct()), ids(p.incorrect())) for p in pairs]
    loaded = load_dataset(_write_csv(tmp_path / "gt.csv", rows, HEADER), model)
    for got, want in zip(loaded, pairs, strict=True):
        assert (got.correct(), got.incorrect()) == (want.correct(), want.incorrect())
        assert got.answer == want.correct()[0] and got.wrong_answer == want.incorrect()[0]
    bad = [(*rows[0][:2], "[]", rows[0][3])]
    with pytest.raises(UsageError, match=r"row 1 .*correct_idx '\[\]' is not a non-empty list"):
        load_dataset(_write_csv(tmp_path / "bad.csv", bad, HEADER), model)
    both = [(*rows[0][:2], ids(["33", "34"]), ids(["34", "20"]))]
    with pytest.raises(UsageError, match="'34' is both a correct and an incorrect answer"):
        load_dataset(_write_csv(tmp_path / "both.csv", both, HEADER), model)


@pytest.mark.parametrize(
    ("rows", "header", "expect"),
    [
        ([(*GOOD, "x", "5")], HEADER, r"row 1 .*correct_idx 'x' is not an integer"),
        ([(*GOOD, "3", "4"), (*GOOD, "99999", "4")], HEADER, r"row 2 .*outside the vocabulary"),
        ([(*GOOD, "3", "")], HEADER, r"row 1 .*incorrect_idx is empty"),
        ([(GOOD[0], "", "3", "4")], HEADER, r"row 1 .*'corrupted' is empty"),
        ([(*GOOD, "3")], HEADER, r"row 1 .*fewer fields"),
        ([GOOD], ["clean", "corrupted"], r"missing column\(s\) correct_idx"),
        ([("a", "b", "3", "4")], ["clean", "corrupt", "correct_idx", "incorrect_idx"], "corrupted"),
        ([], HEADER, "no prompt pairs"),
    ],
)
def test_malformed_csv_names_row_and_problem(tmp_path, rows, header, expect):
    path = _write_csv(tmp_path / "bad.csv", rows, header)
    with pytest.raises(UsageError, match=expect) as exc:
        load_dataset(path, toy_view())
    assert "\n" not in str(exc.value) and exc.value.exit_code == 2


def test_empty_and_unknown_files(tmp_path):
    (tmp_path / "empty.csv").write_text("")
    (tmp_path / "empty.json").write_text("")
    (tmp_path / "data.txt").write_text("x")
    with pytest.raises(UsageError, match="empty file"):
        load_dataset(tmp_path / "empty.csv", toy_view())
    with pytest.raises(UsageError, match="bad JSON"):
        load_dataset(tmp_path / "empty.json", toy_view())
    with pytest.raises(UsageError, match="unknown format"):
        load_dataset(tmp_path / "data.txt", toy_view())
    with pytest.raises(UsageError, match="no such file"):
        load_dataset(tmp_path / "missing.csv", toy_view())


@pytest.mark.parametrize(
    ("doc", "expect"),
    [
        ('{"prompts": [', "bad JSON at line 1"),
        ("[]", "object with a 'prompts' list"),
        ('{"prompts": []}', "no prompt pairs"),
        ('{"prompts": [{"clean": "a", "corrupt": "b", "answers": ["x"]}]}',
         "prompt 1: missing key"),
        ('{"prompts": [{"clean": "a", "corrupt": "b", "answers": [], "wrong_answers": ["y"]}]}',
         "prompt 1: 'answers' must be a non-empty list"),
    ],
)  # fmt: skip
def test_malformed_json_names_prompt_and_problem(tmp_path, doc, expect):
    path = tmp_path / "bad.json"
    path.write_text(doc)
    with pytest.raises(UsageError, match=expect):
        load_dataset(path, toy_view())


def test_dataset_pairs_are_validated_not_dropped(tmp_path):
    model = toy_view()
    rows = [
        (*GOOD, "Paris", "Tokyo"),
        ("The capital of France is", "The capital of is", "Paris", "Tokyo"),
        (*GOOD, "Paris Rome", "Tokyo"),
    ]
    path = _write_csv(tmp_path / "v.csv", rows, ["clean", "corrupted", "answer", "wrong_answer"])
    with pytest.raises(TaskValidationError, match=r"v.csv row 2: clean and corrupted differ"):
        load_dataset(path, model)
    path = _write_csv(
        tmp_path / "w.csv", [rows[0], rows[2]], ["clean", "corrupted", "answer", "wrong_answer"]
    )
    with pytest.raises(TaskValidationError, match=r"w.csv row 2: answer 'Paris Rome' is 2 tokens"):
        load_dataset(path, model)
