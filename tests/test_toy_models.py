"""The built-in toy models (GPT-2 `toy`, Llama `toy-llama`) really solve the tasks; the training
script's first steps run for either architecture."""

from __future__ import annotations

import gc
import time
from pathlib import Path

import pytest
import torch
from tokenizers_for_tests import toy_view

from actstore.model.adapter import load_model
from tools.train_toy import THRESHOLDS, accuracy, held_out_pairs, is_held_out, train

ROOT = Path(__file__).resolve().parents[1]

pytestmark = pytest.mark.slow

N_HELD_OUT = 200


BUILTINS = {"toy": "gpt2", "toy-llama": "llama"}


@pytest.fixture(scope="module", params=list(BUILTINS))
def toy(request):
    load_model(request.param)  # warm the imports; the timing below is of loading alone
    gc.collect()  # not a collection of the objects earlier tests in this worker left behind
    seconds = []
    for _ in range(3):  # the fastest of three: one load's time can include a stray pause
        t0 = time.process_time()  # this process's CPU: other tests beside it do not count
        model = load_model(request.param)
        seconds.append(time.process_time() - t0)
    return model, min(seconds)


def test_toy_loads_offline_fast(toy):
    model, seconds = toy
    assert model.source == "builtin"
    assert seconds < 1.0, f"load_model({model.spec!r}) took {seconds:.2f}s"
    assert model.shape.n_layers == 4 and model.shape.d_model <= 128
    arch = model.architecture
    assert arch.family == BUILTINS[model.spec]
    if arch.family == "llama":  # RMSNorm, rotary, grouped-query attention, SwiGLU
        assert arch.n_kv_heads < arch.n_heads
        assert arch.norm == "rms" and arch.positions == "rotary" and arch.gated_mlp


@pytest.fixture(scope="module")
def held_out_accuracy(toy):
    model, _ = toy
    return accuracy(model.hooked_logits, toy_view(), n=N_HELD_OUT)


@pytest.mark.parametrize("name", list(THRESHOLDS))
def test_toy_held_out_accuracy(held_out_accuracy, name):
    acc = held_out_accuracy[name]
    assert acc["accuracy"] >= THRESHOLDS[name], (name, acc)
    assert acc["logit_diff"] > 0, (name, acc)


def test_held_out_prompts_are_new():
    view = toy_view()
    from ingest.tasks import TASKS

    for task in TASKS.values():
        pairs = held_out_pairs(task, view, 50)
        assert all(is_held_out(p.clean) for p in pairs)
        train_texts = {p.clean for p in task.generate(2000, 0, view) if not is_held_out(p.clean)}
        assert not train_texts & {p.clean for p in pairs}


def test_engine_matches_training_forward(toy):
    """The engine's forward over the adapter's weights computes what the trained model does."""
    from queries.core.engine import Engine

    model, _ = toy
    tokens = torch.tensor([model.tokenize("The capital of France is")])
    with torch.no_grad():
        logits = Engine.from_adapter(model).forward(tokens)
        reference = model.hooked_logits(tokens)
    assert model.tokenizer.decode([int(logits[0, -1].argmax())]) == "Paris"
    torch.testing.assert_close(reference, logits, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_training_first_steps_write_a_loadable_model(tmp_path, arch):
    torch.manual_seed(0)
    acc = train(tmp_path, steps=3, per_task=200, eval_every=0, eval_n=10, arch=arch,
                log=lambda m: None)  # fmt: skip
    assert set(acc) == set(THRESHOLDS)
    for f in ("config.json", "vocab.json", "model.safetensors", "CARD.md"):
        assert (tmp_path / f).exists(), f
    from actstore.model.adapter import _builtin_from_dir

    hf, tokenizer = _builtin_from_dir(tmp_path, random_seed=None)
    assert len(tokenizer.get_vocab()) == hf.config.vocab_size
    assert hf.config.model_type == arch
    assert f"--arch {arch}" in (tmp_path / "CARD.md").read_text()


def test_recall_rows_score_the_word_after_the_earlier_occurrence():
    from tools.train_toy import RECALL_QUERIES, recall_rows

    words = torch.arange(3, 100)
    tokens, targets = recall_rows(64, words, 0, 1, torch.Generator().manual_seed(0))
    distances = set()
    for row, target in zip(tokens.tolist(), targets.tolist(), strict=True):
        scored = [p for p, t in enumerate(target) if t != -100]
        assert len(scored) == RECALL_QUERIES and row[0] == 0
        for p in scored:
            earlier = row.index(row[p])  # the context's words are distinct
            assert earlier < p and target[p] == row[earlier + 1] == row[p + 1]
            distances.add(p - earlier)
    assert len(distances) > 5  # no one relative offset answers them


def test_training_with_recall_rows_records_them_in_the_card(tmp_path):
    train(tmp_path, steps=2, per_task=200, eval_every=0, eval_n=10, arch="llama",
          recall_weight=1.0, log=lambda m: None)  # fmt: skip
    card = (tmp_path / "CARD.md").read_text()
    assert "--recall-weight 1 --recall-units 2" in card and "associative-recall rows" in card


def test_the_training_commands_defaults_are_the_shipped_toys_command():
    """`python -m tools.train_toy` with no options trains the shipped `toy`: every option its
    card's command gives is the default."""
    import shlex

    from tools.train_toy import command_line

    card = (ROOT / "actstore/model/builtin/toy/CARD.md").read_text()
    line = next(x for x in card.splitlines() if "python -m tools.train_toy" in x)
    argv = shlex.split(line.split("tools.train_toy", 1)[1])
    given = vars(command_line().parse_args(argv))
    defaults = vars(command_line().parse_args([]))
    assert given == {**defaults, "until_pass": True}
