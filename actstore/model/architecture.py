"""What a transformer computes, as data: the architecture description and the weights' layout.

Every query runs one engine (queries/core/engine.py) driven by an `Architecture` read from the
model's Hugging Face config, with weights in the one canonical layout of `Weights`, extracted
in one place (`ModelAdapter.weights`). This module is torch-free: it reads configs and JSON.

Supported families (Hugging Face `model_type`): GPT-2, GPT-NeoX (Pythia), GPT-J, Llama (Llama 2
and 3), Mistral, Qwen2 and Gemma 2. What the description covers:
- normalisation: LayerNorm or RMSNorm, an offset added to the norm weight (Gemma's (1 + w)),
  norms after the attention and the MLP as well as before them (Gemma 2);
- positions: learned absolute embeddings, or rotary on the first `rotary_dim` dimensions of each
  head with a base, NeoX pairing (first half with second half) or GPT-J pairing (adjacent
  dimensions), and Llama 3 or linear frequency scaling;
- attention: n_kv_heads key/value heads shared by groups of query heads (multi-head, grouped-query,
  multi-query), scores divided by `attn_scale`, soft-capped (Gemma 2), a sliding window on some
  layers (Gemma 2 alternates; Mistral windows every layer);
- MLP: plain (GELU, ReLU) or gated (SwiGLU, GeGLU); attention and MLP in parallel reading the
  same residual stream (GPT-NeoX, GPT-J) or one after the other;
- an embedding scale (Gemma), a final-logit soft cap (Gemma 2), an unembedding tied to the
  embedding or not, with or without bias.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass
from typing import Any

from actstore.core.errors import UsageError

FAMILIES = {
    "gpt2": "GPT-2",
    "gpt_neox": "GPT-NeoX (Pythia)",
    "gptj": "GPT-J",
    "llama": "Llama",
    "mistral": "Mistral",
    "qwen2": "Qwen2",
    "gemma2": "Gemma 2",
}
ACTIVATIONS = ("gelu", "gelu_new", "gelu_fast", "gelu_pytorch_tanh", "relu", "silu")
ROPE_TYPES = ("default", "linear", "llama3")


def supported_families() -> str:
    return ", ".join(FAMILIES.values())


def check_family(model_type: str | None, spec: str) -> None:
    """Refuse an unsupported model before any weights are read."""
    if model_type not in FAMILIES:
        raise UsageError(
            f"model {spec!r} is a {model_type or 'unknown'} model; actstore supports "
            f"{supported_families()}"
        )


@dataclass(frozen=True)
class Architecture:
    """Everything the engine needs to know besides the weights (see the module docstring).
    The defaulted fields describe GPT-2's choice: no feature of the later families."""

    family: str
    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int
    norm: str  # "layer" | "rms"
    norm_eps: float
    activation: str
    attn_scale: float  # attention scores are q·k / attn_scale
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    unembed_bias: bool
    tied_embeddings: bool
    norm_offset: float = 0.0  # added to every norm weight: 1.0 for Gemma's (1 + w)
    post_norms: bool = False  # Gemma 2: a norm on the attention's and the MLP's outputs too
    parallel: bool = False  # attention and MLP both read the block's input (GPT-NeoX, GPT-J)
    positions: str = "learned"  # "learned" | "rotary"
    rotary_dim: int = 0  # leading dimensions of each head that rotate
    rotary_base: float = 10000.0
    rotary_pairing: str = "neox"  # "neox": dimension i with i + rotary_dim/2; "gptj": 2i, 2i+1
    rope_scaling: dict[str, Any] | None = None  # {"rope_type": "llama3" | "linear", ...}
    attn_softcap: float | None = None  # scores -> cap · tanh(scores / cap)
    sliding_window: int | None = None  # a query sees the last `sliding_window` positions
    sliding_layers: tuple[int, ...] = ()  # the layers that use the window
    gated_mlp: bool = False  # act(x W_gate) * (x W_in), then W_out
    embed_scale: float = 1.0  # token embeddings are multiplied by it (Gemma: sqrt(d_model))
    final_softcap: float | None = None

    @property
    def group_size(self) -> int:
        """Query heads per key/value head."""
        return self.n_heads // self.n_kv_heads

    def window(self, layer: int) -> int | None:
        return self.sliding_window if layer in self.sliding_layers else None

    def kv_head(self, head: int) -> int:
        """The key/value head that query head `head` reads."""
        return head // self.group_size

    def to_json(self) -> str:
        return json.dumps(asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> Architecture:
        d = json.loads(text)
        d["sliding_layers"] = tuple(d["sliding_layers"])
        return cls(**d)


def from_hf_config(config: dict[str, Any], spec: str = "model") -> Architecture:
    """The description of a Hugging Face causal LM from its config (`config.to_dict()`)."""
    family = config.get("model_type")
    check_family(family, spec)
    if family == "gpt2":
        return _gpt2(config, spec)
    if family == "gptj":
        return _gptj(config, spec)
    if family == "gpt_neox":
        return _neox(config, spec)
    return _llama_like(config, spec)


def _activation(name: str | None, spec: str) -> str:
    if name not in ACTIVATIONS:
        raise UsageError(
            f"model {spec!r} uses activation {name!r}; actstore supports {', '.join(ACTIVATIONS)}"
        )
    return name


def _rope(config: dict[str, Any], spec: str) -> tuple[float, float, dict[str, Any] | None]:
    """(base, rotary fraction of each head, scaling) from `rope_parameters`."""
    rope = dict(config.get("rope_parameters") or {})
    kind = rope.get("rope_type", "default")
    if kind not in ROPE_TYPES:
        raise UsageError(
            f"model {spec!r} uses {kind} rotary scaling; actstore supports {', '.join(ROPE_TYPES)}"
        )
    base = float(rope.get("rope_theta", 10000.0))
    fraction = float(rope.get("partial_rotary_factor", 1.0))
    scaling = None
    if kind != "default":
        keep = ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings")
        scaling = {"rope_type": kind, **{k: float(rope[k]) for k in keep if k in rope}}
    return base, fraction, scaling


def _gpt_style(c: dict[str, Any], spec: str) -> dict[str, Any]:
    """The dimensions of a config in GPT-2's naming (GPT-2, GPT-J)."""
    d_model, heads = int(c["n_embd"]), int(c["n_head"])
    return dict(
        n_layers=int(c["n_layer"]), d_model=d_model, n_heads=heads, n_kv_heads=heads,
        d_head=d_model // heads, d_mlp=int(c.get("n_inner") or 4 * d_model),
        d_vocab=int(c["vocab_size"]), n_ctx=int(c["n_positions"]), norm="layer",
        norm_eps=float(c["layer_norm_epsilon"]),
        activation=_activation(c.get("activation_function"), spec),
    )  # fmt: skip


def _gpt2(c: dict[str, Any], spec: str) -> Architecture:
    if c.get("scale_attn_by_inverse_layer_idx"):
        raise UsageError(
            f"model {spec!r} scales attention by the inverse layer index; actstore supports "
            "GPT-2 attention scaled by sqrt(d_head) only"
        )
    dims = _gpt_style(c, spec)
    return Architecture(
        family="gpt2", **dims,
        attn_scale=math.sqrt(dims["d_head"]) if c.get("scale_attn_weights", True) else 1.0,
        qkv_bias=True, o_bias=True, mlp_bias=True, unembed_bias=False,
        tied_embeddings=bool(c.get("tie_word_embeddings", True)),
    )  # fmt: skip


def _gptj(c: dict[str, Any], spec: str) -> Architecture:
    dims = _gpt_style(c, spec)
    return Architecture(
        family="gptj", **dims, attn_scale=math.sqrt(dims["d_head"]), qkv_bias=False,
        o_bias=False, mlp_bias=True, unembed_bias=True,
        tied_embeddings=bool(c.get("tie_word_embeddings", False)), parallel=True,
        positions="rotary", rotary_dim=int(c.get("rotary_dim") or dims["d_head"]),
        rotary_pairing="gptj",
    )  # fmt: skip


def _neox(c: dict[str, Any], spec: str) -> Architecture:
    d_model, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    d_head = d_model // heads
    base, fraction, scaling = _rope(c, spec)
    bias = bool(c.get("attention_bias", True))
    return Architecture(
        family="gpt_neox", n_layers=int(c["num_hidden_layers"]), d_model=d_model,
        n_heads=heads, n_kv_heads=heads, d_head=d_head, d_mlp=int(c["intermediate_size"]),
        d_vocab=int(c["vocab_size"]), n_ctx=int(c["max_position_embeddings"]), norm="layer",
        norm_eps=float(c["layer_norm_eps"]), activation=_activation(c.get("hidden_act"), spec),
        attn_scale=math.sqrt(d_head), qkv_bias=bias, o_bias=bias, mlp_bias=True,
        unembed_bias=False, tied_embeddings=bool(c.get("tie_word_embeddings", False)),
        parallel=bool(c.get("use_parallel_residual", True)), positions="rotary",
        rotary_dim=int(d_head * fraction), rotary_base=base, rope_scaling=scaling,
    )  # fmt: skip


def _llama_like(c: dict[str, Any], spec: str) -> Architecture:
    """Llama, Mistral, Qwen2 and Gemma 2: RMSNorm, rotary, grouped-query, gated MLP."""
    family = c["model_type"]
    gemma = family == "gemma2"
    d_model, heads = int(c["hidden_size"]), int(c["num_attention_heads"])
    d_head = int(c.get("head_dim") or d_model // heads)
    n_layers = int(c["num_hidden_layers"])
    base, fraction, scaling = _rope(c, spec)
    window = c.get("sliding_window")
    kinds = c.get("layer_types")
    if kinds is not None:
        sliding = tuple(i for i, k in enumerate(kinds) if k == "sliding_attention")
    else:  # Mistral: one window for every layer
        sliding = tuple(range(n_layers)) if window else ()
    if not sliding:
        window = None
    attn_bias = bool(c.get("attention_bias", False))
    qkv_bias = True if family == "qwen2" else attn_bias
    o_bias = False if family == "qwen2" else attn_bias
    act = c.get("hidden_activation") if gemma else c.get("hidden_act")
    return Architecture(
        family=family, n_layers=n_layers, d_model=d_model, n_heads=heads,
        n_kv_heads=int(c.get("num_key_value_heads") or heads), d_head=d_head,
        d_mlp=int(c["intermediate_size"]), d_vocab=int(c["vocab_size"]),
        n_ctx=int(c["max_position_embeddings"]), norm="rms", norm_eps=float(c["rms_norm_eps"]),
        activation=_activation(act, spec),
        attn_scale=math.sqrt(float(c["query_pre_attn_scalar"]) if gemma else d_head),
        qkv_bias=qkv_bias, o_bias=o_bias, mlp_bias=bool(c.get("mlp_bias", False)),
        unembed_bias=False, tied_embeddings=bool(c.get("tie_word_embeddings", gemma)),
        norm_offset=1.0 if gemma else 0.0, post_norms=gemma, positions="rotary",
        rotary_dim=int(d_head * fraction), rotary_base=base, rope_scaling=scaling,
        attn_softcap=_cap(c.get("attn_logit_softcapping")) if gemma else None,
        sliding_window=int(window) if window else None, sliding_layers=sliding,
        gated_mlp=True, embed_scale=math.sqrt(d_model) if gemma else 1.0,
        final_softcap=_cap(c.get("final_logit_softcapping")) if gemma else None,
    )  # fmt: skip


def _cap(value: Any) -> float | None:
    return float(value) if value else None


@dataclass
class Norm:
    """A norm's weight as stored (the engine adds `Architecture.norm_offset`) and bias."""

    w: Any
    b: Any = None


@dataclass
class LayerWeights:
    """One block in the canonical layout (TransformerLens' per-head shapes, float32).

    Attention: W_Q (heads, d_model, d_head), W_K and W_V (kv_heads, d_model, d_head), W_O (heads,
    d_head, d_model), biases b_Q (heads, d_head), b_K/b_V (kv_heads, d_head), b_O (d_model,) or
    None. MLP: W_in and W_gate (d_model, d_mlp; W_gate None unless gated), W_out (d_mlp,
    d_model), biases or None. Norms: ln1 before attention, ln2 before the MLP (the same weights
    as ln1 where the model shares one norm, GPT-J), ln1_post / ln2_post after them or None.
    """

    ln1: Norm
    ln2: Norm
    W_Q: Any
    W_K: Any
    W_V: Any
    W_O: Any
    W_in: Any
    W_out: Any
    b_Q: Any = None
    b_K: Any = None
    b_V: Any = None
    b_O: Any = None
    W_gate: Any = None
    b_gate: Any = None
    b_in: Any = None
    b_out: Any = None
    ln1_post: Norm | None = None
    ln2_post: Norm | None = None


@dataclass
class Weights:
    """The whole model: W_E (vocab, d_model), W_pos (n_ctx, d_model) or None, the blocks, the
    final norm, W_U (d_model, vocab) and b_U (vocab,) or None."""

    W_E: Any
    layers: list[LayerWeights]
    ln_final: Norm
    W_U: Any
    W_pos: Any = None
    b_U: Any = None
