"""Patching sites over a store: which activation a hook name means, how to recompute downstream
of it, and the linear map that reads it.

Residual-stream hooks are patched by editing the residual stream itself and running the later
blocks of the engine (queries/core); resid_mid runs the MLP of its layer first (families with
parallel attention and MLP have no resid_mid). Head z and MLP hidden activations are replaced
inside their own block, which starts from the cached resid_pre of that layer.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import torch

from actstore.core.errors import UsageError
from actstore.model.adapter import ModelAdapter
from actstore.model.hooks import hook_name, parse_hook
from queries.core.engine import Engine
from queries.core.reader import Reader, sides
from queries.subspace.diagnostics import PatchBatch

# The hooks a subspace can be patched at, by short hook name.
SITE_KINDS = ("resid_pre", "resid_mid", "resid_post", "mlp_post", "z")
READER_RE = re.compile(r"^(?:(\d+)\.(\d+)\.([qkv])|(\d+)\.mlp|unembed)$")


@dataclass(frozen=True)
class Site:
    """A patchable activation: hook name, kind, layer, head (z only) and vector dimension."""

    hook: str
    kind: str
    layer: int
    head: int | None
    dim: int


def parse_site(model: ModelAdapter, hook: str, head: int | None) -> Site:
    """Validate a hook name and head against the model."""
    parsed = parse_hook(hook)
    if parsed is None or parsed[1] not in SITE_KINDS:
        raise UsageError(
            f"--hook {hook}: give blocks.L.hook_resid_pre|hook_resid_mid|hook_resid_post, "
            "blocks.L.mlp.hook_post or blocks.L.attn.hook_z"
        )
    layer, kind = parsed
    s = model.shape
    if layer >= s.n_layers:
        raise UsageError(f"--hook {hook}: the model has layers 0..{s.n_layers - 1}")
    if kind == "resid_mid" and model.architecture.parallel:
        raise UsageError(
            f"--hook {hook}: {model.spec} runs attention and MLP in parallel, so it has no "
            "resid_mid; use blocks.L.hook_resid_pre or blocks.L.hook_resid_post"
        )
    if kind != "z" and head is not None:
        raise UsageError(f"--head applies to blocks.L.attn.hook_z only, not {hook}")
    if head is not None and not 0 <= head < s.n_heads:
        raise UsageError(f"--head {head}: the model has heads 0..{s.n_heads - 1}")
    dim = {"mlp_post": s.d_mlp, "z": s.d_head if head is not None else s.n_heads * s.d_head}
    return Site(hook, kind, layer, head, dim.get(kind, s.d_model))


def reading_map(engine: Engine, site: Site, reader: str | None) -> torch.Tensor | None:
    """The linear map W (dim, out) through which the site's activation acts downstream.

    MLP hidden -> residual via W_out; head z -> residual via W_O[h] (all heads: W_O stacked);
    a post-norm after either (Gemma 2) scales each output dimension by its weight, folded in.
    Residual stream -> the reader named by `reader` ("L.H.q|k|v", "L.mlp" or "unembed"), with
    the reader's norm folded in as its scale (times centering for LayerNorm): the division by
    the norm rescales, it does not change which directions are read; rotary embeddings rotate
    queries and keys by position, which changes no rowspace either.
    """
    w8 = engine.weights.layers
    with torch.no_grad():
        if site.kind in ("mlp_post", "z"):
            if reader is not None:
                raise UsageError(
                    f"--reader applies to residual-stream hooks; {site.hook} is read by its own "
                    "block's output weights"
                )
            layer = engine.layers[site.layer]
            if site.kind == "mlp_post":
                w, post = w8[site.layer].W_out, layer.ln2_post
            else:
                w_o = w8[site.layer].W_O
                w = w_o[site.head] if site.head is not None else w_o.reshape(-1, w_o.shape[-1])
                post = layer.ln1_post
            w = w.double().cpu()
            return w if post is None else w * post[0].double().cpu()
        if reader is None:
            return None
        m = READER_RE.match(reader)
        if not m:
            raise UsageError(
                f"--reader {reader}: give L.H.q|k|v (a head's input), L.mlp or unembed"
            )
        parallel = engine.arch.parallel
        if m.group(1) is not None:
            layer, h, which = int(m.group(1)), int(m.group(2)), m.group(3)
            _check_reader(engine, site, layer, h, reads_mid=False)
            head = h if which == "q" else engine.arch.kv_head(h)
            w = getattr(w8[layer], f"W_{which.upper()}")[head]
            gamma = engine.layers[layer].ln1[0]
        elif m.group(4) is not None:
            layer = int(m.group(4))
            _check_reader(engine, site, layer, None, reads_mid=not parallel)
            mlp = engine.layers[layer]
            w = mlp.W_in if mlp.W_gate is None else torch.cat([mlp.W_gate, mlp.W_in], 1)
            gamma = mlp.ln2[0]
        else:
            w, gamma = engine.W_U, engine.ln_final[0]
        w, gamma = w.double().cpu(), gamma.double().cpu()
        d = w.shape[0]
        scaled = gamma[:, None] * w
        if engine.arch.norm == "rms":
            return scaled
        return (torch.eye(d, dtype=torch.float64) - 1.0 / d) @ scaled


def _check_reader(engine: Engine, site: Site, layer: int, head: int | None, reads_mid: bool):
    a = engine.arch
    if layer >= a.n_layers or (head is not None and head >= a.n_heads):
        raise UsageError(
            f"--reader: the model has layers 0..{a.n_layers - 1} and heads 0..{a.n_heads - 1}"
        )
    # The first layer whose reader sees this residual stream.
    first = site.layer + (site.kind == "resid_post") + (site.kind == "resid_mid" and not reads_mid)
    if layer < first:
        raise UsageError(
            f"--reader {layer}.{'mlp' if reads_mid else head}: it reads the residual stream "
            f"before {site.hook}; name a reader downstream of the hook"
        )


def positions_mask(
    lengths: np.ndarray, seq: int, pos: str, at: np.ndarray | None = None
) -> torch.Tensor:
    """(batch, seq, 1) mask: all real positions, each prompt's final one, fixed ones ("3,5"),
    or (`at`: (batch, n_roles)) each prompt's own positions of roles."""
    idx = np.arange(seq)[None, :]
    if at is not None:
        mask = (idx[:, :, None] == at[:, None, :]).any(-1)
    elif pos == "all":
        mask = idx < lengths[:, None]
    elif pos == "final":
        mask = idx == (lengths[:, None] - 1)
    else:
        fixed = np.isin(np.arange(seq), [int(p) for p in pos.split(",")])[None, :]
        mask = np.broadcast_to(fixed, (len(lengths), seq))
    return torch.as_tensor(mask, dtype=torch.float32)[..., None]


def site_batches(
    reader: Reader,
    model: ModelAdapter,
    engine: Engine,
    site: Site,
    indices: np.ndarray,
    mode: str,
    pos: str,
    at: np.ndarray | None = None,
) -> Iterator[PatchBatch]:
    """PatchBatches for the chosen prompts, one store chunk at a time (bounded memory); `at`:
    every prompt's positions of the roles --pos names."""
    base_side, src_side = sides(mode)
    act_hook = _stored_activation(reader, site, model)
    for span in reader.spans(chosen=indices):
        base, source = (
            reader.tensor(base_side, act_hook, span),
            reader.tensor(src_side, act_hook, span),
        )
        if site.kind == "z":
            base, source = _z_view(base, site), _z_view(source, site)
        lengths = reader.prompts(span)["seq_len"].to_numpy()
        start = reader.tensor(base_side, hook_name("resid_pre", site.layer), span) if site.kind in (
            "z", "mlp_post") else None  # fmt: skip
        t = reader.targets(span)
        yield PatchBatch(
            base=base,
            source=source,
            mask=positions_mask(
                lengths, base.shape[1], pos, None if at is None else at[span.index]
            ).to(reader.device),
            run=_downstream(engine, site, start, lengths),
            answer=t.answer,
            wrong=t.wrong,
            clean_logits=t.clean_logits,
            corrupted_logits=reader.tensor("corrupted", "logits", span),
            prompt_idx=span.index,
            sets=t.sets,
        )


def _stored_activation(reader: Reader, site: Site, model: ModelAdapter) -> str:
    stored = reader.stored["clean"]
    if site.hook in stored or site.hook in reader.derived:
        return site.hook
    if site.kind == "resid_post" and site.layer + 1 < model.shape.n_layers:
        alias = hook_name("resid_pre", site.layer + 1)
        if alias in stored:
            return alias
    # raises the store's "re-ingest with --hooks" error
    reader.store.array(reader.run_id, "clean", site.hook)
    return site.hook


def _z_view(z: torch.Tensor, site: Site) -> torch.Tensor:
    """The site's vector at each position: one head's z, or all heads' z concatenated."""
    if site.head is not None:
        return z[:, :, site.head]
    return z.reshape(*z.shape[:2], -1)


def _downstream(engine: Engine, site: Site, start: torch.Tensor | None, lengths: np.ndarray):
    """A function from the patched site activation to final-position logits (differentiable,
    for DAS)."""
    e, layer = engine, site.layer
    dev = e.W_U.device
    rows = torch.arange(len(lengths), device=dev)
    last = torch.as_tensor(lengths - 1, dtype=torch.long, device=dev)

    def finish(resid: torch.Tensor) -> torch.Tensor:
        return e.unembed(resid[rows, last])

    def run(act: torch.Tensor) -> torch.Tensor:
        if site.kind == "resid_pre":
            return finish(e.run_blocks(act, layer))
        if site.kind == "resid_post":
            return finish(e.run_blocks(act, layer + 1))
        if site.kind == "resid_mid":
            return finish(e.run_blocks(act + e.mlp(layer, act), layer + 1))

        def replace(value: torch.Tensor) -> torch.Tensor:
            if site.kind == "mlp_post" or site.head is None:
                return act.reshape(value.shape).to(value.dtype)
            value = value.clone()
            value[:, :, site.head] = act.to(value.dtype)
            return value

        edit = {"edit_hidden": replace} if site.kind == "mlp_post" else {"edit_z": replace}
        return finish(e.run_blocks(e.block(layer, start, **edit), layer + 1))

    return run
