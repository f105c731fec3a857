"""The transformer's pieces as plain tensor kernels, so that a recompute can skip work TL cannot.

A GPT-2-style block is ln1 → attention → + → ln2 → MLP → +. Writing it here (instead of calling
the bridge's blocks) lets a patched run attend over cached keys/values of earlier positions,
compute queries only where the metric needs them, and count every matmul's floating-point
operations for the benchmark's bound. `Kernels.from_adapter` reads the weights in TL layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

from actstore.errors import ActstoreError
from actstore.models import ModelAdapter

ACTIVATIONS = {
    "gelu_new": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_fast": lambda x: F.gelu(x, approximate="tanh"),
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
    "relu": F.relu,
}


@dataclass
class Layer:
    ln1_w: torch.Tensor
    ln1_b: torch.Tensor
    W_q: torch.Tensor  # (d_model, n_heads * d_head)
    b_q: torch.Tensor
    W_kv: torch.Tensor  # (d_model, 2 * n_heads * d_head): K and V side by side
    b_kv: torch.Tensor
    W_O: torch.Tensor  # (n_heads, d_head, d_model)
    b_O: torch.Tensor
    ln2_w: torch.Tensor
    ln2_b: torch.Tensor
    W_in: torch.Tensor
    b_in: torch.Tensor
    W_out: torch.Tensor
    b_out: torch.Tensor


@dataclass
class Kernels:
    """Weights of every layer plus the unembedding, and a running FLOP count of the work done."""

    layers: list[Layer]
    lnf_w: torch.Tensor
    lnf_b: torch.Tensor
    W_U: torch.Tensor  # (d_model, d_vocab)
    b_U: torch.Tensor
    n_heads: int
    d_head: int
    eps: float
    act_name: str
    flops: float = field(default=0.0)

    @classmethod
    def from_adapter(cls, model: ModelAdapter) -> Kernels:
        b = model.bridge
        cfg = b.cfg
        if cfg.act_fn not in ACTIVATIONS:
            raise ActstoreError(
                f"model {model.spec!r} uses activation {cfg.act_fn!r}; downstream recompute "
                f"supports {', '.join(ACTIVATIONS)}"
            )
        if getattr(cfg, "normalization_type", "LN") != "LN":
            raise ActstoreError(
                f"model {model.spec!r} uses {cfg.normalization_type} normalization; downstream "
                "recompute supports LayerNorm (GPT-2 architecture)"
            )

        def t(x: torch.Tensor) -> torch.Tensor:
            return x.detach().to(torch.float32).contiguous()

        def heads_in(w: torch.Tensor) -> torch.Tensor:  # (H, D, dh) -> (D, H*dh)
            return w.detach().permute(1, 0, 2).reshape(w.shape[1], -1)

        layers = []
        with torch.no_grad():
            for blk in b.blocks:
                a, m = blk.attn, blk.mlp
                layers.append(
                    Layer(
                        ln1_w=t(blk.ln1.w), ln1_b=t(blk.ln1.b),
                        W_q=t(heads_in(a.W_Q)), b_q=t(a.b_Q.reshape(-1)),
                        W_kv=t(torch.cat([heads_in(a.W_K), heads_in(a.W_V)], 1)),
                        b_kv=t(torch.cat([a.b_K.reshape(-1), a.b_V.reshape(-1)])),
                        W_O=t(a.W_O), b_O=t(a.b_O),
                        ln2_w=t(blk.ln2.w), ln2_b=t(blk.ln2.b),
                        W_in=t(m.W_in), b_in=t(m.b_in), W_out=t(m.W_out), b_out=t(m.b_out),
                    )
                )  # fmt: skip
            return cls(
                layers=layers,
                lnf_w=t(b.ln_final.w),
                lnf_b=t(b.ln_final.b),
                W_U=t(b.W_U),
                b_U=t(b.b_U),
                n_heads=int(cfg.n_heads),
                d_head=int(cfg.d_head),
                eps=float(cfg.eps),
                act_name=cfg.act_fn,
            )

    @property
    def n_layers(self) -> int:
        return len(self.layers)

    # ---- position-wise pieces: any leading shape -------------------------------------------

    def linear(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor | None) -> torch.Tensor:
        """x @ w + b over the last axis, counting 2·rows·in·out FLOPs."""
        lead = x.shape[:-1]
        x2 = x.reshape(-1, x.shape[-1])
        self.flops += 2.0 * x2.shape[0] * w.shape[0] * w.shape[1]
        out = torch.addmm(b, x2, w) if b is not None else x2 @ w
        return out.reshape(*lead, w.shape[1])

    def ln(self, x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        return F.layer_norm(x, (x.shape[-1],), w, b, self.eps)

    def mlp(self, layer: int, mid: torch.Tensor) -> torch.Tensor:
        """The MLP's output (not added to the residual) at every position of `mid`."""
        L = self.layers[layer]
        h = self.linear(self.ln(mid, L.ln2_w, L.ln2_b), L.W_in, L.b_in)
        return self.linear(ACTIVATIONS[self.act_name](h), L.W_out, L.b_out)

    def ln1(self, layer: int, resid: torch.Tensor) -> torch.Tensor:
        L = self.layers[layer]
        return self.ln(resid, L.ln1_w, L.ln1_b)

    def q(self, layer: int, normed: torch.Tensor) -> torch.Tensor:
        """Queries (…, heads, d_head) of an ln1-normalised residual."""
        L = self.layers[layer]
        return self.linear(normed, L.W_q, L.b_q).unflatten(-1, (self.n_heads, self.d_head))

    def kv(self, layer: int, normed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values (…, heads, d_head) of an ln1-normalised residual."""
        L = self.layers[layer]
        out = self.linear(normed, L.W_kv, L.b_kv).unflatten(-1, (2, self.n_heads, self.d_head))
        return out[..., 0, :, :], out[..., 1, :, :]

    def attn_out(self, layer: int, z: torch.Tensor) -> torch.Tensor:
        """Σ_h z_h W_O[h] + b_O for z (…, heads, d_head)."""
        L = self.layers[layer]
        return self.linear(z.reshape(*z.shape[:-2], -1), L.W_O.reshape(-1, L.W_O.shape[-1]), L.b_O)

    def unembed_ln(self, resid: torch.Tensor) -> torch.Tensor:
        return self.ln(resid, self.lnf_w, self.lnf_b)

    # ---- attention over cached prefix keys/values ------------------------------------------

    def attend(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        k_prefix: torch.Tensor,
        v_prefix: torch.Tensor,
        q_pos: torch.Tensor,
        start: int,
    ) -> torch.Tensor:
        """z for queries q (n, B, Tq, H, dh) over prefix keys (B, P, H, dh) and own keys k, v
        (n, B, T, H, dh) at absolute positions start..start+T-1; q_pos (B, Tq) are the queries'
        absolute positions. Causal: a query sees keys at positions ≤ its own. The prefix is
        shared by the n variants of each prompt, so it is broadcast, never copied."""
        scale = 1.0 / math.sqrt(self.d_head)
        T = k.shape[2]
        key_pos = torch.arange(start, start + T, device=q.device)
        scores = torch.einsum("nbqhd,nbkhd->nbhqk", q, k) * scale
        mask = key_pos.view(1, 1, T) > q_pos.unsqueeze(-1)  # (B, Tq, T)
        scores = scores.masked_fill(mask[None, :, None], float("-inf"))
        n, B, Tq, H, dh = q.shape
        P = k_prefix.shape[1]
        self.flops += 4.0 * n * B * Tq * H * dh * (T + P)
        if P:
            pre = torch.einsum("nbqhd,bkhd->nbhqk", q, k_prefix) * scale
            pattern = torch.cat([pre, scores], -1).softmax(-1)
            z = torch.einsum("nbhqk,bkhd->nbqhd", pattern[..., :P], v_prefix)
            return z + torch.einsum("nbhqk,nbkhd->nbqhd", pattern[..., P:], v)
        return torch.einsum("nbhqk,nbkhd->nbqhd", scores.softmax(-1), v)

    def forward_flops(self, batch: int, seq: int) -> float:
        """FLOPs of one full forward pass (all positions, full unembedding), as TL runs it."""
        L = self.layers[0]
        d_model, hd = L.W_q.shape[0], self.n_heads * self.d_head
        per_token = 2 * (d_model * 3 * hd + hd * d_model + 2 * d_model * L.W_in.shape[1])
        attn = 4.0 * seq * hd  # scores and mix against every key (masked ones included)
        blocks = self.n_layers * batch * seq * (per_token + attn)
        return blocks + 2.0 * batch * seq * d_model * self.W_U.shape[1]
