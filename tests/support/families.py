"""Tiny random models of every supported family as Hugging Face directories, built offline.

Each family is configured so that what sets it apart matters at these sizes: GPT-2 has learned
positions, LayerNorm and a bias on every projection; GPT-NeoX rotates a
quarter of each head and runs attention and MLP in parallel; GPT-J pairs adjacent dimensions and
has an unembedding bias; Llama has 4 query / 2 key-value heads and Llama 3 rope scaling over a
short original context; Qwen2 has q/k/v biases and one key-value head; Mistral a sliding window
on every layer; Gemma 2 soft caps at the scale of its scores and logits, a window of 4 on
alternate layers, query_pre_attn_scalar ≠ head_dim and norms after each sublayer. Norm weights
and every bias are randomised (fresh configs set them to 1 and 0, which hides a kernel that
ignores them). The tokenizer is the toy models' word-level one, so every task runs on them.
"""

from __future__ import annotations

from pathlib import Path

import torch

FAMILIES = ("gpt2", "gpt_neox", "gptj", "llama", "qwen2", "mistral", "gemma2")
D_MODEL, N_HEADS, N_LAYERS, D_MLP = 32, 4, 3, 48


def tokenizer():
    from actstore.model.tokenizer import word_level_tokenizer
    from ingest.tasks import toy_vocabulary

    return word_level_tokenizer(toy_vocabulary(), name="family")


def config(family: str, vocab: int, kv_heads: int | None = None):
    """The family's tiny config; `kv_heads` overrides its number of key/value heads."""
    import transformers as tf

    common = dict(vocab_size=vocab, bos_token_id=0, eos_token_id=0, pad_token_id=1,
                  initializer_range=0.15)  # fmt: skip
    llama_like = dict(common, hidden_size=D_MODEL, num_attention_heads=N_HEADS,
                      intermediate_size=D_MLP, num_hidden_layers=N_LAYERS,
                      max_position_embeddings=64)  # fmt: skip
    if family == "gpt2":
        return tf.GPT2Config(**common, n_embd=D_MODEL, n_head=N_HEADS, n_layer=N_LAYERS,
                             n_inner=D_MLP, n_positions=64)  # fmt: skip
    if family == "gpt_neox":
        return tf.GPTNeoXConfig(**llama_like, rotary_pct=0.25, use_parallel_residual=True)
    if family == "gptj":
        return tf.GPTJConfig(**common, n_embd=D_MODEL, n_head=N_HEADS, n_layer=N_LAYERS,
                             n_inner=D_MLP, n_positions=64, rotary_dim=4)  # fmt: skip
    if family == "llama":
        rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                "high_freq_factor": 4.0, "original_max_position_embeddings": 8}  # fmt: skip
        return tf.LlamaConfig(**llama_like, num_key_value_heads=kv_heads or 2, rope_scaling=rope)
    if family == "qwen2":
        return tf.Qwen2Config(**llama_like, num_key_value_heads=kv_heads or 1)
    if family == "mistral":
        return tf.MistralConfig(**llama_like, num_key_value_heads=kv_heads or 2, sliding_window=5)
    if family == "gemma2":
        return tf.Gemma2Config(**llama_like, num_key_value_heads=kv_heads or 2, head_dim=16,
                               query_pre_attn_scalar=24, sliding_window=4,
                               attn_logit_softcapping=1.5, final_logit_softcapping=3.0)  # fmt: skip
    raise ValueError(family)


def random_model(family: str, seed: int = 0):
    """(HF model, tokenizer) with randomised norm weights and biases."""
    from transformers import AutoModelForCausalLM

    tok = tokenizer()
    torch.manual_seed(seed)
    hf = AutoModelForCausalLM.from_config(config(family, len(tok)), attn_implementation="eager")
    randomise_norms(hf)
    return hf.eval(), tok


def randomise_norms(hf) -> None:
    """Move a Hugging Face model's norm weights and its biases off a fresh model's 1 and 0 (with
    torch's current random state), in place."""
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name or ".ln" in name:
                p.add_(0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.add_(0.1 * torch.randn_like(p))


def save(family: str, path: Path, seed: int = 0) -> Path:
    """A Hugging Face directory (config, weights, tokenizer) of the family's random model."""
    hf, tok = random_model(family, seed)
    hf.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def split_input_twin(hf, family: str):
    """A model computing the same function whose attention TransformerLens can split into
    per-head q/k/v inputs, for the edge references: the model itself where it has one key/value
    head per query head; under grouped-query attention the same family with its key/value heads
    repeated, one per query head (whose per-head key and value inputs are the engine's
    per-query-head copies); for GPT-J, whose bridge has no split inputs, a GPT-NeoX model."""
    if family == "gptj":
        return _gptj_as_neox(hf)
    cfg = hf.config
    if getattr(cfg, "num_key_value_heads", cfg.num_attention_heads) == cfg.num_attention_heads:
        return hf
    from transformers import AutoModelForCausalLM

    twin = AutoModelForCausalLM.from_config(
        config(family, cfg.vocab_size, kv_heads=cfg.num_attention_heads),
        attn_implementation="eager",
    )
    repeat = cfg.num_attention_heads // cfg.num_key_value_heads
    state = {}
    for name, value in hf.state_dict().items():
        if any(f"self_attn.{p}_proj" in name for p in "kv"):
            grouped = value.reshape(cfg.num_key_value_heads, -1, *value.shape[1:])
            value = grouped.repeat_interleave(repeat, 0).reshape(-1, *value.shape[1:])
        state[name] = value
    twin.load_state_dict(state)
    return twin.eval()


def _gptj_as_neox(hf):
    """GPT-J as GPT-NeoX: both norms are ln_1, q/k/v fused per head, and the rotary dimensions
    of q and k permuted from GPT-J's adjacent pairs (2i, 2i+1) to NeoX's (i, i + r/2), which
    leaves every score unchanged; attention biases zero, and an unembedding head with GPT-J's
    bias (NeoX has none)."""
    import transformers as tf

    c = hf.config
    heads, d_head, r = c.n_head, c.n_embd // c.n_head, c.rotary_dim
    neox = tf.GPTNeoXForCausalLM(tf.GPTNeoXConfig(
        vocab_size=c.vocab_size, hidden_size=c.n_embd, num_attention_heads=heads,
        num_hidden_layers=c.n_layer, intermediate_size=c.n_inner,
        max_position_embeddings=c.n_positions, rotary_pct=r / d_head,
        use_parallel_residual=True, hidden_act=c.activation_function,
        layer_norm_eps=c.layer_norm_epsilon, tie_word_embeddings=False,
    ))  # fmt: skip
    order = torch.cat([torch.arange(0, r, 2), torch.arange(1, r, 2), torch.arange(r, d_head)])
    with torch.no_grad():
        neox.gpt_neox.embed_in.weight.copy_(hf.transformer.wte.weight)
        for old, new in zip(hf.transformer.h, neox.gpt_neox.layers, strict=True):
            for norm in (new.input_layernorm, new.post_attention_layernorm):
                norm.load_state_dict(old.ln_1.state_dict())
            a = old.attn
            q, k, v = (w.weight.reshape(heads, d_head, -1) for w in (a.q_proj, a.k_proj, a.v_proj))
            qkv = torch.stack([q[:, order], k[:, order], v], 1)  # (heads, 3, d_head, d_model)
            new.attention.query_key_value.weight.copy_(qkv.reshape(-1, c.n_embd))
            new.attention.dense.weight.copy_(a.out_proj.weight)
            new.attention.query_key_value.bias.zero_()  # TL's NeoX bridge wants the biases
            new.attention.dense.bias.zero_()
            new.mlp.dense_h_to_4h.load_state_dict(old.mlp.fc_in.state_dict())
            new.mlp.dense_4h_to_h.load_state_dict(old.mlp.fc_out.state_dict())
        neox.gpt_neox.final_layer_norm.load_state_dict(hf.transformer.ln_f.state_dict())
        neox.lm_head = torch.nn.Linear(c.n_embd, c.vocab_size)
        neox.lm_head.load_state_dict(hf.lm_head.state_dict())
    return neox.eval()
