"""Hook-and-gradient references for edge attribution and circuits, independent of actstore's engine.

Everything here runs TransformerLens' bridge over the Hugging Face model through the adapter's
hooked forward (hook_z, hook_mlp_out, hook_q/k/v_input, hook_mlp_in, ln_final.hook_in) and reads
W_O and b_O as TransformerLens presents them. A head's output is z·W_O[h]; under a
post-attention norm (Gemma 2) it is the documented share w ⊙ (z·W_O[h] + b_O/heads) / rms(o) of
the normed output, o the layer's attention output.
"""

from __future__ import annotations

import numpy as np
import torch

from queries.attribution import Graph


def data_of(store, run: int = 1) -> dict:
    """A run's clean and corrupted token ids and each prompt's final position, answer and wrong
    answer (the `data` the functions here take), read from its store."""
    prompts = store.prompts(run)

    def ids(column: str) -> torch.Tensor:
        return torch.as_tensor(prompts[column].to_numpy().copy(), dtype=torch.long)

    data = {side: torch.as_tensor(store.read(run, side, "tokens"), dtype=torch.long)
            for side in ("clean", "corrupted")}  # fmt: skip
    data.update(last=ids("seq_len") - 1, answer=ids("answer_token"),
                wrong=ids("wrong_answer_token"))  # fmt: skip
    return data


def logit_diff(logits: torch.Tensor, data: dict) -> torch.Tensor:
    """Mean logit difference at each prompt's final position (full-sequence logits)."""
    rows = torch.arange(logits.shape[0])
    final = logits[rows, data["last"]]
    return (final[rows, data["answer"]] - final[rows, data["wrong"]]).mean()


def graph_of(adapter) -> Graph:
    return Graph.of(adapter.architecture)


def head_shares(adapter, layer: int, z: torch.Tensor) -> torch.Tensor:
    """Every head's output (batch, pos, heads, d_model) from its z, by the definition above."""
    attn = adapter.bridge.blocks[layer].attn  # TransformerLens' own W_O, not the canonical weights
    W_O, b_O = attn.W_O, attn.b_O
    per = torch.einsum("bphe,hed->bphd", z, W_O)
    arch = adapter.architecture
    if not arch.post_norms:
        return per
    post = adapter.weights().layers[layer].ln1_post
    if b_O is not None:
        per = per + b_O / per.shape[2]
    total = per.sum(2, keepdim=True)
    scale = torch.rsqrt(total.pow(2).mean(-1, keepdim=True) + arch.norm_eps)
    return per * scale * (arch.norm_offset + post.w)


def node_outputs(adapter, tokens: torch.Tensor) -> torch.Tensor:
    """Every node's output (batch, pos, n_forward, d_model) from a TL run_with_cache."""
    with torch.no_grad():
        _, cache = adapter.run_with_cache(tokens)
        cols = [cache["blocks.0.hook_resid_pre"][:, :, None]]
        for layer in range(adapter.shape.n_layers):
            cols.append(head_shares(adapter, layer, cache[f"blocks.{layer}.attn.hook_z"]))
            cols.append(cache[f"blocks.{layer}.hook_mlp_out"][:, :, None])
    return torch.cat(cols, dim=2).detach()


def input_hooks(adapter) -> list[tuple[str, slice]]:
    """TL hook names of every destination input, with its backward slice (per-head for qkv)."""
    g = graph_of(adapter)
    h = adapter.shape.n_heads
    out = []
    for layer in range(adapter.shape.n_layers):
        start = g.layer_start(layer)
        for i, kind in enumerate("qkv"):
            out.append(
                (f"blocks.{layer}.hook_{kind}_input", slice(start + i * h, start + (i + 1) * h))
            )
        out.append((f"blocks.{layer}.hook_mlp_in", slice(start + 3 * h, start + 3 * h + 1)))
    return out + [("ln_final.hook_in", slice(g.n_backward - 1, g.n_backward))]


def hooked_input_grads(adapter, tokens: torch.Tensor, data: dict, metric=None) -> torch.Tensor:
    """∂(mean metric)/∂(every destination input) by autograd through TL's hooked forward;
    `metric(logits, data)` defaults to the mean logit difference."""
    metric = metric or logit_diff
    g = graph_of(adapter)
    captured: dict[tuple[int, int], torch.Tensor] = {}

    def capture(cols: slice):
        def fn(act, hook):
            # a copy: the bridge hands hook_mlp_in the resid_mid tensor that the residual add
            # also uses; only the returned tensor feeds the MLP, so its gradient is the MLP's
            act = act.clone()
            captured[(cols.start, cols.stop)] = act
            return act

        return fn

    hooks = [(name, capture(cols)) for name, cols in input_hooks(adapter)]
    value = metric(adapter.hooked_logits(tokens, hooks, split_inputs=True), data)
    grads = torch.autograd.grad(value, list(captured.values()))
    b, p = tokens.shape
    out = torch.zeros(b, p, g.n_backward, adapter.shape.d_model)
    for (start, stop), grad in zip(captured, grads, strict=True):
        out[:, :, start:stop] = grad if grad.ndim == 4 else grad[:, :, None]
    return out


def eap_scores(adapter, data: dict, at: str = "clean") -> np.ndarray:
    """(other run − run `at`) · ∂m/∂input at run `at`, on the edges: EAP at the clean run, the
    edges of AtP at the corrupted one."""
    other = "corrupted" if at == "clean" else "clean"
    grads = hooked_input_grads(adapter, data[at], data)
    diff = node_outputs(adapter, data[other]) - node_outputs(adapter, data[at])
    return torch.einsum("bpsd,bpnd->sn", diff, grads).numpy() * graph_of(adapter).real


def hooked_circuit_metric(adapter, data: dict, mask: np.ndarray, metric=None) -> float:
    """m(C) by a TL forward whose input hooks add (corrupted − this run's) source outputs;
    `metric(logits, data)` defaults to the mean logit difference."""
    metric = metric or logit_diff
    g = graph_of(adapter)
    corrupted = node_outputs(adapter, data["corrupted"])
    dropped = torch.as_tensor(g.real & ~mask, dtype=torch.float32)
    outs: dict[int, torch.Tensor] = {}

    def record(first: int, heads_of: int | None = None):
        def fn(act, hook):
            if heads_of is None:
                outs[first] = act
                return act
            act_out = head_shares(adapter, heads_of, act)
            for h in range(adapter.shape.n_heads):
                outs[first + h] = act_out[:, :, h]
            return act

        return fn

    def patch(cols: slice):
        def fn(act, hook):
            n_up = int(g.n_upstream[cols.start])
            current = torch.stack([outs[i] for i in range(n_up)], dim=2)
            delta = corrupted[:, :, :n_up] - current
            add = torch.einsum("bpsd,sn->bpnd", delta, dropped[:n_up, cols])
            return act + (add if act.ndim == 4 else add[:, :, 0])

        return fn

    hooks = [("blocks.0.hook_resid_pre", record(0))]
    for layer in range(adapter.shape.n_layers):
        hooks.append((f"blocks.{layer}.attn.hook_z", record(g.head_index(layer, 0), layer)))
        hooks.append((f"blocks.{layer}.hook_mlp_out", record(g.mlp_index(layer))))
    hooks += [(name, patch(cols)) for name, cols in input_hooks(adapter)]
    with torch.no_grad():
        return float(metric(adapter.hooked_logits(data["clean"], hooks, split_inputs=True), data))


def hooked_edge_effects(adapter, data: dict, cells, metric=None) -> dict[tuple[int, int], float]:
    """m(clean run with edge (forward, backward) carrying its corrupted value) − m(clean), one
    hooked TransformerLens forward per edge: the destination input's hook adds the source's
    corrupted − clean output (everything upstream of the destination is clean)."""
    metric = metric or logit_diff
    delta = node_outputs(adapter, data["corrupted"]) - node_outputs(adapter, data["clean"])
    with torch.no_grad():
        clean = float(metric(adapter.hooked_logits(data["clean"], split_inputs=True), data))
    out = {}
    for f, b in cells:
        name, cols = next((n, c) for n, c in input_hooks(adapter) if c.start <= b < c.stop)

        def patch(act, hook, f=f, index=b - cols.start):
            act = act.clone()
            if act.ndim == 4:
                act[:, :, index] += delta[:, :, f]
            else:
                act += delta[:, :, f]
            return act

        with torch.no_grad():
            logits = adapter.hooked_logits(data["clean"], [(name, patch)], split_inputs=True)
        out[(int(f), int(b))] = float(metric(logits, data)) - clean
    return out


def sample_edges(graph: Graph) -> list[tuple[int, int]]:
    """Two edges into every destination input: from the input node and from its nearest
    upstream node (a same-layer head for an MLP, the last MLP for logits)."""
    return sorted({(s, b) for b in range(graph.n_backward)
                   for s in (0, int(graph.n_upstream[b]) - 1)})  # fmt: skip
