"""Reading one batch of a run's cached activations into tensors, both sides, every layer.

Patching never reruns the base run or the source run: both come from the store. `pre[n_layers]`
is the residual stream after the last block (the stored `resid_final`). The attention's residual
contribution is resid_mid − resid_pre where the family has a resid_mid, else the stored
`hook_attn_out` (parallel attention and MLP).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from actstore.errors import UsageError
from actstore.store import Store
from queries.metrics import AnswerSets, Targets

HOOKS = {
    "pre": "blocks.{l}.hook_resid_pre",
    "mid": "blocks.{l}.hook_resid_mid",
    "z": "blocks.{l}.attn.hook_z",
    "mlp": "blocks.{l}.hook_mlp_out",
    "attn": "blocks.{l}.hook_attn_out",
}


@dataclass
class Side:
    """One side's cached activations per layer: kind ("pre", "mid", "z", "mlp", "attn") → list
    over layers."""

    acts: dict[str, list[torch.Tensor]]

    def __getitem__(self, kind: str) -> list[torch.Tensor]:
        return self.acts[kind]

    def attn(self, layer: int) -> torch.Tensor:
        """The attention's residual contribution: stored, or resid_mid − resid_pre."""
        if "attn" in self.acts:
            return self.acts["attn"][layer]
        return self.acts["mid"][layer] - self.acts["pre"][layer]


@dataclass
class Batch:
    """Prompts [lo, hi) of a run: the base run patched into, the source patched from."""

    lo: int
    hi: int
    finals: torch.Tensor  # (B,) each prompt's final position
    targets: Targets
    base: Side
    src: Side
    base_logits: torch.Tensor  # (B, d_vocab) stored final logits of the base run
    corrupted_logits: torch.Tensor
    base_tokens: torch.Tensor | None = None  # (B, seq), read for the full-forward reference

    @property
    def size(self) -> int:
        return self.hi - self.lo


def read_side(
    store: Store, run_id: int, side: str, kinds: set[str], n_layers: int, lo: int, hi: int,
    device: str,
) -> Side:  # fmt: skip
    acts: dict[str, list[torch.Tensor]] = {}
    final = f"blocks.{n_layers - 1}.hook_resid_post"
    for kind in sorted(kinds):
        names = [HOOKS[kind].format(l=layer) for layer in range(n_layers)]
        if kind == "pre":
            names.append(final)
        acts[kind] = [_tensor(store, run_id, side, name, lo, hi, device) for name in names]
    return Side(acts)


def read_batch(
    store: Store,
    run_id: int,
    direction: str,
    base_kinds: set[str],
    src_kinds: set[str],
    n_layers: int,
    prompts: dict[str, np.ndarray],
    lo: int,
    hi: int,
    device: str,
    tokens: bool = False,
) -> Batch:
    base_side, src_side = (
        ("corrupted", "clean") if direction == "denoise" else ("clean", "corrupted")
    )
    logits = {
        s: _tensor(store, run_id, s, "logits", lo, hi, device) for s in ("clean", "corrupted")
    }

    def ids(col: str) -> torch.Tensor:
        return torch.tensor(prompts[col][lo:hi], dtype=torch.long, device=device)

    return Batch(
        lo=lo,
        hi=hi,
        finals=ids("seq_len") - 1,
        targets=Targets(
            ids("answer_token"),
            ids("wrong_answer_token"),
            logits["clean"],
            AnswerSets.from_arrays(prompts, lo, hi, device),
        ),  # fmt: skip
        base=read_side(store, run_id, base_side, base_kinds, n_layers, lo, hi, device),
        src=read_side(store, run_id, src_side, src_kinds, n_layers, lo, hi, device),
        base_logits=logits[base_side],
        corrupted_logits=logits["corrupted"],
        base_tokens=_tokens(store, run_id, base_side, lo, hi, device) if tokens else None,
    )


def _tokens(store: Store, run_id: int, side: str, lo: int, hi: int, device: str):
    return torch.as_tensor(store.read(run_id, side, "tokens", lo, hi), dtype=torch.long,
                           device=device)  # fmt: skip


def _tensor(store: Store, run_id: int, side: str, hook: str, lo: int, hi: int, device: str):
    try:
        data = store.read(run_id, side, hook, lo, hi)
    except UsageError as exc:
        raise UsageError(
            f"patching needs {hook} ({side}) in run {run_id}: {exc}. Ingest with the default "
            "--hooks"
        ) from None
    return torch.as_tensor(data.astype(np.float32, copy=False), device=device)
