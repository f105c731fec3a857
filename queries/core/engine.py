"""The transformer, implemented once: normalisation, positions, attention, MLP and unembedding.

Every query computes with this engine: patching's downstream recompute
(queries/patching/recompute.py), the edge-patchable forward of attribution and circuits
(queries/attribution/edge_model.py) and subspace patching's downstream runs
(queries/subspace/sites.py). It is driven by the architecture description and the canonical
weights that the model adapter reads (actstore.model.architecture), so one code path serves
every supported family.

The pieces are position-wise functions of any leading shape, plus `attend`, which takes keys and
values at absolute positions: a recompute that starts at position s reuses the base run's keys and
values of positions < s (a shared prefix), and rotary embeddings, causal masks and sliding windows
all see true positions, so the reuse is exact. Every matmul adds its floating-point operations to
`flops`, which the benchmarks compare with a full forward's.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from actstore.model.adapter import ModelAdapter
from actstore.model.architecture import Architecture, Norm, Weights

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
    "silu": F.silu,
}

NormParams = tuple[torch.Tensor, torch.Tensor | None]


@dataclass
class _Layer:
    """One block's weights in the flat forms the engine multiplies by: views of the model's
    parameters where their layout allows, never concatenated copies (at Llama-3.2-1B shape
    those would copy gigabytes on every query for no fewer FLOPs)."""

    ln1: NormParams
    ln2: NormParams
    ln1_post: NormParams | None
    ln2_post: NormParams | None
    W_q: torch.Tensor  # (d_model, heads * d_head)
    b_q: torch.Tensor | None
    W_k: torch.Tensor  # (d_model, kv_heads * d_head)
    b_k: torch.Tensor | None
    W_v: torch.Tensor
    b_v: torch.Tensor | None
    W_o: torch.Tensor  # (heads * d_head, d_model)
    b_O: torch.Tensor | None
    W_gate: torch.Tensor | None  # (d_model, d_mlp), None unless the MLP is gated
    b_gate: torch.Tensor | None
    W_in: torch.Tensor  # (d_model, d_mlp)
    b_in: torch.Tensor | None
    W_out: torch.Tensor
    b_out: torch.Tensor | None
    window: int | None


class Engine:
    """A model's forward pass in pieces over its canonical weights, counting FLOPs."""

    def __init__(self, arch: Architecture, weights: Weights):
        self.arch = arch
        self.weights = weights
        self.flops = 0.0
        self.act = ACTIVATIONS[arch.activation]
        self.layers = [self._fuse(i) for i in range(arch.n_layers)]
        self.ln_final = self.norm_params(weights.ln_final)
        self.W_U, self.b_U = weights.W_U, weights.b_U
        self.inv_freq = _inv_freq(arch, weights.W_E.device)

    @classmethod
    def from_adapter(cls, model: ModelAdapter) -> Engine:
        return cls(model.architecture, model.weights())

    def _fuse(self, i: int) -> _Layer:
        w, a = self.weights.layers[i], self.arch

        def flat_in(x: torch.Tensor) -> torch.Tensor:  # (n, d_model, d_head) -> (d_model, n·d_head)
            return x.permute(1, 0, 2).reshape(x.shape[1], -1)

        def flat_bias(b: torch.Tensor | None) -> torch.Tensor | None:
            return None if b is None else b.reshape(-1)

        return _Layer(
            ln1=self.norm_params(w.ln1), ln2=self.norm_params(w.ln2),
            ln1_post=None if w.ln1_post is None else self.norm_params(w.ln1_post),
            ln2_post=None if w.ln2_post is None else self.norm_params(w.ln2_post),
            W_q=flat_in(w.W_Q), b_q=flat_bias(w.b_Q),
            W_k=flat_in(w.W_K), b_k=flat_bias(w.b_K), W_v=flat_in(w.W_V), b_v=flat_bias(w.b_V),
            W_o=w.W_O.reshape(-1, a.d_model), b_O=w.b_O,
            W_gate=w.W_gate if a.gated_mlp else None, b_gate=w.b_gate if a.gated_mlp else None,
            W_in=w.W_in, b_in=w.b_in, W_out=w.W_out, b_out=w.b_out, window=a.window(i),
        )  # fmt: skip

    def norm_params(self, norm: Norm) -> NormParams:
        """A norm's effective weight (the stored one plus the family's offset) and bias."""
        return norm.w + self.arch.norm_offset, norm.b

    @property
    def n_layers(self) -> int:
        return self.arch.n_layers

    @property
    def n_heads(self) -> int:
        return self.arch.n_heads

    @property
    def d_head(self) -> int:
        return self.arch.d_head

    # ---- position-wise pieces: any leading shape -------------------------------------------

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """x @ w + b over the last axis, counting 2·rows·in·out FLOPs."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        self.flops += 2.0 * x2.shape[0] * w.shape[0] * w.shape[1]
        out = torch.addmm(b, x2, w) if b is not None else x2 @ w
        return out.reshape(*lead, w.shape[1])

    def norm(self, x: torch.Tensor, params: NormParams) -> torch.Tensor:
        """LayerNorm or RMSNorm over the last axis."""
        w, b = params
        if self.arch.norm == "layer":
            return F.layer_norm(x, (x.shape[-1],), w, b, self.arch.norm_eps)
        return x * self.inverse_rms(x) * w

    def inverse_rms(self, x: torch.Tensor) -> torch.Tensor:
        """1 / sqrt(mean(x²) + eps) over the last axis (kept): RMSNorm's scale of each row."""
        return torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.arch.norm_eps)

    def ln1(self, layer: int, resid: torch.Tensor) -> torch.Tensor:
        return self.norm(resid, self.layers[layer].ln1)

    def rotate(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Rotary embedding of x (…, T, heads, d_head) at absolute positions (…, T)."""
        if self.inv_freq is None:
            return x
        r = self.arch.rotary_dim
        freqs = positions.float()[..., None] * self.inv_freq  # angle of each pair, as HF has it
        if self.arch.rotary_pairing == "neox":  # dimension i pairs with i + r/2
            angles = torch.cat([freqs, freqs], -1)
        else:  # GPT-J: dimensions 2i and 2i+1 form a pair
            angles = freqs.repeat_interleave(2, -1)
        cos, sin = angles.cos().unsqueeze(-2), angles.sin().unsqueeze(-2)
        rot, rest = x[..., :r], x[..., r:]
        if self.arch.rotary_pairing == "neox":
            turned = torch.cat([-rot[..., r // 2 :], rot[..., : r // 2]], -1)
        else:
            turned = torch.stack([-rot[..., 1::2], rot[..., ::2]], -1).flatten(-2)
        return torch.cat([rot * cos + turned * sin, rest], -1)

    def q(self, layer: int, normed: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Queries (…, T, heads, d_head) of an ln1-normalised residual at positions (…, T)."""
        L = self.layers[layer]
        q = self.linear(normed, L.W_q, L.b_q).unflatten(-1, (self.n_heads, self.d_head))
        return self.rotate(q, positions)

    def kv(
        self, layer: int, normed: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated) and values (…, T, kv_heads, d_head) of an ln1-normalised residual."""
        L, heads = self.layers[layer], (self.arch.n_kv_heads, self.d_head)
        k = self.linear(normed, L.W_k, L.b_k).unflatten(-1, heads)
        return self.rotate(k, positions), self.linear(normed, L.W_v, L.b_v).unflatten(-1, heads)

    def attn_out(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """Σ_h z_h W_O[h] + b_O for z (…, heads, d_head): the output before any post-norm."""
        L = self.layers[layer]
        return self.linear(z.reshape(*z.shape[:-2], -1), L.W_o, L.b_O)

    def attn_residual(self, layer: int, out: torch.Tensor) -> torch.Tensor:
        """What the attention adds to the residual stream: its output, post-normed if the
        family has a norm after attention (Gemma 2)."""
        post = self.layers[layer].ln1_post
        return out if post is None else self.norm(out, post)

    def head_outputs(
        self, layer: int, z: torch.Tensor, heads: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Each head's share of the attention's residual contribution, (…, heads, d_model), and
        the part no head owns, so that shares + rest = `attn_residual(attn_out(z))`.

        Without a post-norm a head's share is z_h·W_O[h] and b_O is the rest. With Gemma 2's
        post-attention RMSNorm, out = w ⊙ o · rsqrt(mean(o²) + eps) with o = Σ_h o_h + b_O is
        linear in o for the layer's scale, so head h's share is w ⊙ (o_h + b_O/heads) times that
        scale: the shares still sum to the residual contribution, and nothing is left over.
        `heads` (query head indices, z holding only theirs) is for families without a
        post-norm, where a head's share does not depend on the other heads.
        """
        L = self.layers[layer]
        W_O = self.weights.layers[layer].W_O
        if heads is not None:
            if L.ln1_post is not None:
                raise ValueError("under a post-attention norm every head's share needs all heads")
            W_O = W_O[heads]
        per = torch.einsum("...hd,hdD->...hD", z, W_O)
        self.flops += 2.0 * z.numel() * W_O.shape[-1]
        if L.ln1_post is None:
            return per, self.head_rest(layer)
        if L.b_O is not None:
            per = per + L.b_O / self.n_heads
        w, _ = L.ln1_post
        total = per.sum(-2, keepdim=True)
        scale = self.inverse_rms(total)
        return per * scale * w, None

    def head_rest(self, layer: int) -> torch.Tensor | None:
        """The part of the attention's residual contribution that `head_outputs` gives no head:
        b_O without a post-attention norm, nothing with one."""
        L = self.layers[layer]
        return L.b_O if L.ln1_post is None else None

    def mlp_hidden(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The MLP's hidden activation (…, d_mlp) for its input residual x: ln2, then
        act(x W_in) or act(x W_gate) * (x W_in)."""
        L = self.layers[layer]
        normed = self.norm(x, L.ln2)
        h = self.linear(normed, L.W_in, L.b_in)
        if L.W_gate is None:
            return self.act(h)
        gate = self.act(self.linear(normed, L.W_gate, L.b_gate))
        return gate * h if torch.is_grad_enabled() else gate.mul_(h)  # no third d_mlp-wide copy

    def mlp_out(self, layer: int, hidden: torch.Tensor) -> torch.Tensor:
        """What the MLP adds to the residual stream from its hidden activation."""
        L = self.layers[layer]
        out = self.linear(hidden, L.W_out, L.b_out)
        return out if L.ln2_post is None else self.norm(out, L.ln2_post)

    def mlp(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """The MLP's residual contribution for its input residual x (not added to it)."""
        return self.mlp_out(layer, self.mlp_hidden(layer, x))

    def mlp_of_heads(
        self,
        layer: int,
        x: torch.Tensor,
        base: torch.Tensor,
        dz: torch.Tensor,
        heads: torch.Tensor,
    ) -> torch.Tensor:
        """`mlp(layer, x)` (n, B, T, D) for inputs that differ from a shared one by heads' z:
        x = base + Σ_m dz_m·W_O[heads_m] (base (B, T, D), dz (n, B, T, m, d_head), heads (n, m)).

        ln2 scales each row (RMSNorm; LayerNorm after centring, which is linear too), so the MLP's
        input projections of x are the row's scale times the projection of base, made once, plus
        each head's dz through W_O[h]·ln2·W (d_head × d_mlp, once per head): d_head instead of
        d_model columns per variant. Families without a post-attention norm only (there x is
        not linear in the heads' z); no autograd (it writes its intermediates in place)."""
        L = self.layers[layer]
        if L.ln1_post is not None:
            raise ValueError("under a post-attention norm the MLP input is not linear in z")
        w, b = L.ln2

        def centred(t: torch.Tensor) -> torch.Tensor:
            return t - t.mean(-1, keepdim=True) if self.arch.norm == "layer" else t

        scale = self.inverse_rms(centred(x))
        ids, where = heads.unique(return_inverse=True)
        W_O = centred(self.weights.layers[layer].W_O[ids]) * w  # (heads, d_head, D)
        shared = centred(base) * w

        n, B, T, m, dh = dz.shape
        changes = dz.reshape(n, B * T, m * dh)

        def project(weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
            per_head = self.linear(W_O, weight, None)[where].flatten(1, 2)  # (n, m·d_head, out)
            self.flops += 2.0 * dz.numel() * weight.shape[1]
            once = self.linear(shared, weight, None).reshape(1, B * T, -1)
            out = torch.baddbmm(once.expand(n, -1, -1), changes, per_head)
            out.mul_(scale.view(n, -1, 1))
            if b is not None:
                out += b @ weight
            if bias is not None:
                out += bias
            return out.view(n, B, T, -1)

        h = project(L.W_in, L.b_in)
        if L.W_gate is None:
            hidden = self.act(h)
        else:
            hidden = self.act(project(L.W_gate, L.b_gate)).mul_(h)
        return self.mlp_out(layer, hidden)

    def embed(self, tokens: torch.Tensor, positions: torch.Tensor | None = None) -> torch.Tensor:
        """The residual stream entering block 0: scaled token embeddings (+ learned positions)
        of tokens (…, T) at absolute positions (T,), by default 0..T-1."""
        w = self.weights
        x = w.W_E[tokens]
        if self.arch.embed_scale != 1.0:
            x = x * torch.tensor(self.arch.embed_scale, dtype=x.dtype)
        if w.W_pos is not None:
            if positions is None:
                positions = torch.arange(tokens.shape[-1], device=tokens.device)
            x = x + w.W_pos[positions]
        return x

    def _softcap(self, logits: torch.Tensor) -> torch.Tensor:
        cap = self.arch.final_softcap
        return logits if cap is None else torch.tanh(logits / cap) * cap

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits over the vocabulary: final norm, W_U, b_U, soft cap."""
        normed = self.norm(resid, self.ln_final)
        return self._softcap(self.linear(normed, self.W_U, self.b_U))

    def unembed_columns(self, resid: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        """Only the logits a metric reads: resid (…, B, d_model), ids (B, k) -> (…, B, k)."""
        normed = self.norm(resid, self.ln_final)
        w = self.W_U[:, ids]  # (d_model, B, k)
        self.flops += 2.0 * normed.numel() * ids.shape[-1]
        logits = torch.einsum("...bd,dbk->...bk", normed, w)
        if self.b_U is not None:
            logits = logits + self.b_U[ids]
        return self._softcap(logits)

    # ---- attention over keys/values at absolute positions ----------------------------------

    def attend(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        q_pos: torch.Tensor,
        start: int,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """z (n, B, Tq, heads, d_head) for queries q (n, B, Tq, heads, d_head) at absolute
        positions q_pos (B, Tq).

        Keys and values k, v (n, B, T, kv_heads, d_head) sit at positions start..start+T-1; an
        optional prefix (B, P, kv_heads, d_head) at positions 0..P-1 is shared by the n variants
        of each prompt, so it is broadcast, never copied. Query head h reads key/value head
        h // (heads / kv_heads). A query sees keys at positions ≤ its own and, on a layer with a
        sliding window W, > its own − W.
        """
        n, B, Tq, H, dh = q.shape
        P = 0 if prefix is None else prefix[0].shape[1]
        pattern = self.pattern(layer, q, k, q_pos, start, None if prefix is None else prefix[0])
        z = torch.einsum("nbgrqk,nbkgd->nbqgrd", pattern[..., P:], v)
        if P:
            z = z + torch.einsum("nbgrqk,bkgd->nbqgrd", pattern[..., :P], prefix[1])
        return z.reshape(n, B, Tq, H, dh)

    def pattern(
        self,
        layer: int,
        q: torch.Tensor,
        k: torch.Tensor,
        q_pos: torch.Tensor,
        start: int,
        prefix_k: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Attention probabilities (n, B, kv_heads, heads / kv_heads, Tq, P + T) of queries q
        (n, B, Tq, heads, d_head) at positions q_pos (B, Tq) over keys k (n, B, T, kv_heads,
        d_head) at start..start+T-1 after an optional shared prefix (B, P, kv_heads, d_head) at
        0..P-1: scaled scores, soft cap, causal mask and sliding window, softmax (what `attend`
        weights the values by; query head h is (h // (heads / kv_heads), h % (heads /
        kv_heads)))."""
        a = self.arch
        n, B, Tq, H, dh = q.shape
        G, T = k.shape[-2], k.shape[2]
        qg = q.reshape(n, B, Tq, G, H // G, dh)
        scores = torch.einsum("nbqgrd,nbkgd->nbgrqk", qg, k)
        key_pos = torch.arange(start, start + T, device=q.device)
        P = 0 if prefix_k is None else prefix_k.shape[1]
        if P:
            pre = torch.einsum("nbqgrd,bkgd->nbgrqk", qg, prefix_k)
            scores = torch.cat([pre, scores], -1)
            key_pos = torch.cat([torch.arange(P, device=q.device), key_pos])
        self.flops += 4.0 * n * B * Tq * H * dh * (T + P)
        scores = scores * (1.0 / a.attn_scale)
        if a.attn_softcap is not None:
            scores = torch.tanh(scores / a.attn_softcap) * a.attn_softcap
        hidden = key_pos.view(1, 1, -1) > q_pos.unsqueeze(-1)  # (B, Tq, keys)
        window = self.layers[layer].window
        if window is not None:
            hidden = hidden | (key_pos.view(1, 1, -1) <= q_pos.unsqueeze(-1) - window)
        return scores.masked_fill(hidden[None, :, None, None], float("-inf")).softmax(-1)

    def attention_pattern(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """Attention probabilities (B, heads, T, T) of `layer` over the residual x (B, T, D)
        entering it, at positions 0..T-1: TransformerLens' hook_pattern."""
        normed = self.ln1(layer, x)
        pos = torch.arange(x.shape[1], device=x.device)
        k, _ = self.kv(layer, normed, pos)
        q = self.q(layer, normed, pos)
        p = self.pattern(layer, q[None], k[None], pos.expand(x.shape[0], -1), 0)[0]
        B, G, R, T, K = p.shape
        return p.reshape(B, G * R, T, K)

    def attention_z(self, layer: int, x: torch.Tensor) -> torch.Tensor:
        """z (B, T, heads, d_head) of the attention of `layer` over the residual x (B, T, D)
        at positions 0..T-1."""
        normed = self.ln1(layer, x)
        pos = torch.arange(x.shape[1], device=x.device)
        k, v = self.kv(layer, normed, pos)
        q = self.q(layer, normed, pos)
        return self.attend(layer, q[None], k[None], v[None], pos.expand(x.shape[0], -1), 0)[0]

    def head_inputs_z(
        self,
        layer: int,
        x: torch.Tensor,
        heads: torch.Tensor | None = None,
        start: int = 0,
        prefix: tuple[torch.Tensor, torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """z (B, T, heads, d_head) when every query head reads its own q, k and v inputs
        x (B, T, 3·heads, D): query head h's key and value are its key/value head's weights
        applied to its own inputs, so heads that share a key/value head can be given different
        key or value inputs (edge patching). With equal inputs this is `attention_z`. `heads`
        (query head indices) computes only those heads, x holding only their inputs; x may sit
        at positions start.. after a prefix of keys and values (B, start, heads, d_head) per
        query head (`query_head_kv`)."""
        w, L = self.weights.layers[layer], self.layers[layer]
        if heads is None:
            heads = torch.arange(self.n_heads, device=x.device)
        H = len(heads)
        group = heads // self.arch.group_size
        normed = self.norm(x, L.ln1)
        pos = torch.arange(start, start + x.shape[1], device=x.device)

        def project(part: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None):
            self.flops += 2.0 * part.numel() * weight.shape[-1]
            out = torch.einsum("bphd,hde->bphe", part, weight)
            return out if bias is None else out + bias

        def of(t: torch.Tensor | None, index: torch.Tensor) -> torch.Tensor | None:
            return None if t is None else t[index]

        q = project(normed[:, :, :H], w.W_Q[heads], of(w.b_Q, heads))
        k = project(normed[:, :, H : 2 * H], w.W_K[group], of(w.b_K, group))
        v = project(normed[:, :, 2 * H :], w.W_V[group], of(w.b_V, group))
        q, k = self.rotate(q, pos), self.rotate(k, pos)
        q_pos = pos.expand(x.shape[0], -1)
        return self.attend(layer, q[None], k[None], v[None], q_pos, start, prefix)[0]

    def query_head_kv(self, layer: int, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys (rotated) and values (B, T, heads, d_head), one copy per query head, of the
        residual x (B, T, D) at positions 0..T-1: the prefix `head_inputs_z` attends to."""
        pos = torch.arange(x.shape[1], device=x.device)
        k, v = self.kv(layer, self.ln1(layer, x), pos)
        group = torch.arange(self.n_heads, device=x.device) // self.arch.group_size
        return k[:, :, group], v[:, :, group]

    # ---- whole blocks ----------------------------------------------------------------------

    def block(
        self,
        layer: int,
        x: torch.Tensor,
        edit_z: Callable[[torch.Tensor], torch.Tensor] | None = None,
        edit_hidden: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """One block over the residual x (B, T, D); `edit_z` / `edit_hidden` may replace the
        heads' z or the MLP's hidden activation on the way."""
        z = self.attention_z(layer, x)
        if edit_z is not None:
            z = edit_z(z)
        mid = x + self.attn_residual(layer, self.attn_out(layer, z))
        hidden = self.mlp_hidden(layer, x if self.arch.parallel else mid)
        if edit_hidden is not None:
            hidden = edit_hidden(hidden)
        return mid + self.mlp_out(layer, hidden)

    def run_blocks(self, x: torch.Tensor, start: int, stop: int | None = None) -> torch.Tensor:
        """Blocks [start, stop) over the residual x (B, T, D)."""
        for layer in range(start, self.n_layers if stop is None else stop):
            x = self.block(layer, x)
        return x

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits (B, T, vocab) of a full forward pass."""
        return self.unembed(self.run_blocks(self.embed(tokens), 0))

    def forward_flops(self, batch: int, seq: int) -> float:
        """FLOPs of one full forward pass (all positions, full unembedding), as TL runs it."""
        a = self.arch
        q, kv = a.n_heads * a.d_head, a.n_kv_heads * a.d_head
        mlp_in = a.d_mlp * (2 if a.gated_mlp else 1)
        per_token = 2 * (a.d_model * (q + 2 * kv) + q * a.d_model + a.d_model * mlp_in
                         + a.d_mlp * a.d_model)  # fmt: skip
        attn = 4.0 * seq * q  # scores and mix against every key (masked ones included)
        blocks = a.n_layers * batch * seq * (per_token + attn)
        return blocks + 2.0 * batch * seq * a.d_model * a.d_vocab


def _inv_freq(arch: Architecture, device: torch.device) -> torch.Tensor | None:
    """The rotation frequency of each rotary pair (None without rotary positions)."""
    r = arch.rotary_dim
    if arch.positions != "rotary" or r == 0:
        return None
    inv_freq = 1.0 / (arch.rotary_base ** (torch.arange(0, r, 2, dtype=torch.int64).float() / r))
    return _scaled(inv_freq, arch.rope_scaling).to(device)


def _scaled(inv_freq: torch.Tensor, scaling: dict | None) -> torch.Tensor:
    """Frequencies under linear or Llama 3 scaling (Llama 3.1's smooth interpolation between
    long wavelengths divided by `factor` and short ones left alone)."""
    if scaling is None:
        return inv_freq
    factor = scaling["factor"]
    if scaling["rope_type"] == "linear":
        return inv_freq / factor
    low, high = scaling["low_freq_factor"], scaling["high_freq_factor"]
    old = scaling["original_max_position_embeddings"]
    wavelen = 2 * math.pi / inv_freq
    llama = torch.where(wavelen > old / low, inv_freq / factor, inv_freq)
    smooth = (old / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * llama / factor + smooth * llama
    medium = ~(wavelen < old / high) * ~(wavelen > old / low)
    return torch.where(medium, smoothed, llama)
