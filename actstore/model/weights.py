"""A Hugging Face model's parameters, family by family, in the one canonical layout of
`actstore.model.architecture.Weights`: the only code that knows where each family (GPT-2, GPT-J,
GPT-NeoX, Llama-like) keeps its attention, MLP and norm modules. The adapter calls it on the
model the bridge wraps; the engine computes from what it returns.
"""

from __future__ import annotations

from typing import Any

from actstore.model.architecture import Architecture, LayerWeights, Norm, Weights


def extract_weights(hf: Any, arch: Architecture) -> Weights:
    """The one place that reads a Hugging Face model's parameters (see Weights for the layout)."""
    import torch

    def t(x: Any) -> Any:  # a view of the parameter where it is float32 already
        return None if x is None else x.detach().to(torch.float32)

    def bias(module: Any) -> Any:  # a parameter only: the bridge may attach a zero tensor
        return t(dict(module.named_parameters(recurse=False)).get("bias"))

    def norm(module: Any) -> Norm:
        module = _raw(module)
        return Norm(t(module.weight), bias(module))

    def linear(module: Any) -> tuple[Any, Any]:
        """(d_in, d_out) weight and bias of an nn.Linear (GPT-2's Conv1D is stored that way)."""
        module = _raw(module)
        return t(module.weight if arch.family == "gpt2" else module.weight.T), bias(module)

    def heads_in(w: Any, n: int) -> Any:  # (d_model, n * d_head) -> (n, d_model, d_head)
        return w.reshape(w.shape[0], n, arch.d_head).permute(1, 0, 2)

    def heads_bias(b: Any, n: int) -> Any:
        return None if b is None else b.reshape(n, arch.d_head)

    def heads_out(w: Any) -> Any:  # (heads * d_head, d_model) -> (heads, d_head, d_model)
        return w.reshape(arch.n_heads, arch.d_head, w.shape[-1])

    H, G = arch.n_heads, arch.n_kv_heads
    layers = []
    for block in _blocks(hf, arch):
        block = _raw(block)
        attn, mlp = _raw(_attention_of(block, arch)), _raw(block.mlp)
        if arch.family == "gpt2":
            w, b = linear(attn.c_attn)
            qkv = [(w[:, i * arch.d_model : (i + 1) * arch.d_model],
                    b[i * arch.d_model : (i + 1) * arch.d_model]) for i in range(3)]  # fmt: skip
            o = linear(attn.c_proj)
        elif arch.family == "gpt_neox":  # per head [q, k, v] side by side
            w, b = linear(attn.query_key_value)
            w = w.reshape(arch.d_model, H, 3, arch.d_head)
            b = None if b is None else b.reshape(H, 3, arch.d_head)
            qkv = [(w[:, :, i].reshape(arch.d_model, -1),
                    None if b is None else b[:, i].reshape(-1)) for i in range(3)]  # fmt: skip
            o = linear(attn.dense)
        else:
            qkv = [linear(attn.q_proj), linear(attn.k_proj), linear(attn.v_proj)]
            o = linear(attn.out_proj if arch.family == "gptj" else attn.o_proj)
        (wq, bq), (wk, bk), (wv, bv) = qkv
        ln1, ln2, ln1_post, ln2_post = _norms_of(block, arch)
        if arch.gated_mlp:
            (w_gate, b_gate), (w_in, b_in) = linear(mlp.gate_proj), linear(mlp.up_proj)
            w_out, b_out = linear(mlp.down_proj)
        else:
            names = {"gpt2": ("c_fc", "c_proj"), "gptj": ("fc_in", "fc_out"),
                     "gpt_neox": ("dense_h_to_4h", "dense_4h_to_h")}[arch.family]  # fmt: skip
            w_in, b_in = linear(getattr(mlp, names[0]))
            w_out, b_out = linear(getattr(mlp, names[1]))
            w_gate = b_gate = None
        layers.append(
            LayerWeights(
                ln1=norm(ln1), ln2=norm(ln2),
                ln1_post=None if ln1_post is None else norm(ln1_post),
                ln2_post=None if ln2_post is None else norm(ln2_post),
                W_Q=heads_in(wq, H), W_K=heads_in(wk, G), W_V=heads_in(wv, G),
                b_Q=heads_bias(bq, H), b_K=heads_bias(bk, G), b_V=heads_bias(bv, G),
                W_O=heads_out(o[0]), b_O=o[1], W_in=w_in, b_in=b_in, W_gate=w_gate,
                b_gate=b_gate, W_out=w_out, b_out=b_out,
            )
        )  # fmt: skip
    out = _raw(hf.get_output_embeddings())
    positions = _raw(hf.transformer.wpe).weight if arch.family == "gpt2" else None
    return Weights(
        W_E=t(_raw(hf.get_input_embeddings()).weight),
        W_pos=t(positions),
        layers=layers,
        ln_final=norm(_final_norm(hf, arch)),
        W_U=t(out.weight.T),
        b_U=bias(out),
    )


def _raw(module: Any) -> Any:
    """The Hugging Face module itself: the bridge wraps the HF model's modules in place."""
    return getattr(module, "original_component", None) or module


def _blocks(hf: Any, arch: Architecture) -> Any:
    if arch.family in ("gpt2", "gptj"):
        return hf.transformer.h
    if arch.family == "gpt_neox":
        return hf.gpt_neox.layers
    return hf.model.layers


def _attention_of(block: Any, arch: Architecture) -> Any:
    if arch.family in ("gpt2", "gptj"):
        return block.attn
    return block.attention if arch.family == "gpt_neox" else block.self_attn


def _norms_of(block: Any, arch: Architecture) -> tuple[Any, Any, Any, Any]:
    """(ln1, ln2, ln1_post, ln2_post) modules of a block."""
    if arch.family == "gpt2":
        return block.ln_1, block.ln_2, None, None
    if arch.family == "gptj":
        return block.ln_1, block.ln_1, None, None
    if arch.post_norms:
        return (block.input_layernorm, block.pre_feedforward_layernorm,
                block.post_attention_layernorm, block.post_feedforward_layernorm)  # fmt: skip
    return block.input_layernorm, block.post_attention_layernorm, None, None


def _final_norm(hf: Any, arch: Architecture) -> Any:
    if arch.family in ("gpt2", "gptj"):
        return hf.transformer.ln_f
    return hf.gpt_neox.final_layer_norm if arch.family == "gpt_neox" else hf.model.norm
