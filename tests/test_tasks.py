"""Every task: seeded, validated against the toy and a GPT-2-style BPE tokenizer, never padded."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest
from tokenizers_for_tests import bpe_view, toy_view

from actstore.core.errors import UsageError
from ingest.tasks import TASKS, TaskValidationError, get_task, toy_vocabulary, validate_pairs
from ingest.tasks.base import is_word_level

FIXED_NAMES = {"ioi", "colored-objects", "greater-than", "sva", "capital-country"}
ROOT = Path(__file__).resolve().parents[1]
VIEWS = {"toy": toy_view, "bpe": bpe_view}


def test_fixed_task_names_are_registered():
    assert set(TASKS) == FIXED_NAMES
    with pytest.raises(UsageError, match="known tasks"):
        get_task("nope")


@pytest.mark.parametrize("view", sorted(VIEWS))
@pytest.mark.parametrize("name", sorted(FIXED_NAMES))
def test_generate_is_seeded_and_valid(name, view):
    model = VIEWS[view]()
    task = get_task(name)
    pairs = task.generate(60, seed=7, model=model)
    assert len(pairs) == 60
    assert pairs == task.generate(60, seed=7, model=model)
    assert pairs != task.generate(60, seed=8, model=model)
    validate_pairs(pairs, model, name)  # raises on any bad pair
    for p in pairs:
        assert p.answer != p.wrong_answer
        assert p.clean != p.corrupted
        assert p.subject_words and all(w in p.clean for w in p.subject_words)
        assert len(model.token_ids(p.clean)) == len(model.token_ids(p.corrupted))


@pytest.mark.parametrize("name", sorted(FIXED_NAMES))
def test_phrasing_follows_the_tokenizer(name):
    toy, bpe = toy_view(), bpe_view()
    assert is_word_level(toy) and not is_word_level(bpe)
    for p in get_task(name).generate(30, seed=1, model=toy):
        assert not p.answer.startswith(" ")
    for p in get_task(name).generate(30, seed=1, model=bpe):
        if name == "greater-than":  # "17" + "32": the year continues without a space
            assert len(p.answer) == 2 and p.answer.isdigit()
            assert " 17" in p.clean or any(f" {c}" in p.clean for c in range(11, 18))
        else:
            assert p.answer.startswith(" ") and p.wrong_answer.startswith(" ")
        assert " ," not in p.clean and " ." not in p.clean


def test_natural_phrasings_match_the_literature():
    bpe = bpe_view()
    co = get_task("colored-objects").generate(1, 0, bpe)[0]
    assert co.clean.startswith("On the ") and co.clean.endswith("? Answer:")
    gt = get_task("greater-than").generate(1, 0, bpe)[0]
    assert "lasted from the year " in gt.clean and gt.corrupted.split()[-5].endswith("01")
    assert int(gt.answer) > int(gt.wrong_answer) == gt.meta["yy"]
    cc = get_task("capital-country").generate(1, 0, bpe)[0]
    assert "capital of" in cc.clean


def test_task_semantics():
    toy = toy_view()
    for p in get_task("greater-than").generate(200, 3, toy):
        assert int(p.answer) > int(p.wrong_answer) > 1
        assert " 01 " in p.corrupted
    for p in get_task("sva").generate(100, 3, toy):
        assert (p.answer, p.wrong_answer) in {("is", "are"), ("are", "is")}
        assert p.meta["plural"] == (p.answer == "are")
    for p in get_task("colored-objects").generate(100, 3, toy):
        assert f"{p.meta['object']} {p.answer} " in p.clean
        assert f"{p.meta['corrupt_object']} {p.wrong_answer} " in p.corrupted
        assert p.clean.endswith(f"The {p.meta['object']}")
    for p in get_task("ioi").generate(100, 3, toy):
        assert p.clean.count(p.wrong_answer) == 2 and p.clean.count(p.answer) == 1


def test_length_mismatch_is_reported_with_the_text():
    toy = toy_view()
    p = get_task("ioi").generate(3, 0, toy)[2]
    bad = dataclasses.replace(p, corrupted=p.corrupted.replace(" to", " to the", 1))
    with pytest.raises(TaskValidationError) as exc:
        validate_pairs([p, p, bad], toy, "ioi")
    msg = str(exc.value)
    assert "pair 2" in msg and "token length" in msg and bad.clean in msg and "\n" not in msg


@pytest.mark.parametrize("view", sorted(VIEWS))
def test_multi_token_answer_is_reported_with_the_text(view):
    model = VIEWS[view]()
    p = get_task("capital-country").generate(1, 0, model)[0]
    answer = "Paris Rome" if view == "toy" else " Jane"
    bad = dataclasses.replace(p, answer=answer)
    with pytest.raises(TaskValidationError) as exc:
        validate_pairs([bad], model, "capital-country")
    msg = str(exc.value)
    assert repr(answer) in msg and p.clean in msg and "exactly 1" in msg and "\n" not in msg
    assert exc.value.exit_code == 2


def test_out_of_vocabulary_word_is_reported():
    toy = toy_view()
    p = get_task("sva").generate(1, 0, toy)[0]
    bad = dataclasses.replace(p, clean=p.clean.replace("The", "Zebra"))
    with pytest.raises(TaskValidationError, match="outside the model's vocabulary"):
        validate_pairs([bad], toy, "sva")


def test_shipped_toy_vocabulary_is_the_tasks_vocabulary():
    shipped = json.loads((ROOT / "actstore/model/builtin/toy/vocab.json").read_text())
    config = json.loads((ROOT / "actstore/model/builtin/toy/config.json").read_text())
    assert shipped[:3] == ["<|bos|>", "<|pad|>", "<|unk|>"]
    assert shipped[3:] == toy_vocabulary()
    assert config["vocab_size"] == len(shipped)
