"""The model adapter: built-in, Hugging Face directory, and the engine's pieces over it."""

from __future__ import annotations

import pytest
import torch

from actstore.core.errors import UsageError
from actstore.model.adapter import load_model


def test_engine_pieces_compose_to_the_full_forward(toy_random):
    from queries.core.engine import Engine

    engine = Engine.from_adapter(toy_random)
    tokens = torch.tensor([toy_random.tokenize("When Mary and John went to the store , John")] * 2)
    with torch.no_grad():
        full = toy_random.hooked_logits(tokens)
        mine = engine.forward(tokens)
        _, cache = toy_random.run_with_cache(tokens, {"blocks.2.hook_resid_pre"})
        resumed = engine.unembed(engine.run_blocks(cache["blocks.2.hook_resid_pre"], start=2))
    assert torch.allclose(full, mine, atol=1e-5)
    assert torch.allclose(full, resumed, atol=1e-5)


def test_hooked_logits_apply_hooks(toy_random):
    tokens = torch.tensor([toy_random.tokenize("Mary gave a book to")])
    seen = []
    toy_random.hooked_logits(tokens, [("blocks.1.hook_resid_mid", lambda a, hook: seen.append(
        a.shape))])  # fmt: skip
    assert seen == [torch.Size([1, 6, toy_random.shape.d_model])]


def test_hugging_face_directory_loads_offline(tmp_path, toy_random):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(1)
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_inner=64, n_positions=32,
                        vocab_size=len(toy_random.tokenizer))  # fmt: skip
    hf = GPT2LMHeadModel(config).eval()
    hf.save_pretrained(tmp_path / "m")
    toy_random.tokenizer.save_pretrained(tmp_path / "m")
    model = load_model(str(tmp_path / "m"))
    assert model.source == "path" and model.shape.n_layers == 2 and model.shape.d_model == 32
    tokens = torch.tensor([model.tokenize("Mary gave a book to")])
    with torch.no_grad():
        assert torch.allclose(model.hooked_logits(tokens), hf(tokens).logits, atol=1e-4)


def test_unknown_models_are_usage_errors(tmp_path):
    with pytest.raises(UsageError, match="unknown built-in model 'toy-nope'"):
        load_model("toy-nope")
    with pytest.raises(UsageError, match="has no config.json"):
        load_model(str(tmp_path))


def test_fingerprint_tells_models_apart(toy_random, tmp_path):
    assert toy_random.fingerprint == load_model("toy-random").fingerprint
