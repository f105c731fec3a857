"""One ingest batch: its arrays' shapes, the forward pass of both sides, and the durable write
of its chunks. Shared by the ingest runner, shards (into staged arrays) and repair (which
recomputes a damaged batch and rewrites its chunks).
"""

from __future__ import annotations

import hashlib
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from actstore.core import arrays as zarrays
from actstore.core.choices import SIDES
from actstore.core.location import ArraysRoot, as_root
from actstore.model.adapter import ModelAdapter
from actstore.model.derivable import LOGITS, resid_pre
from actstore.model.hooks import hook_shape
from actstore.model.metrics import AnswerSets, answer_prob, logit_diff, padded_sets
from ingest.corruptions import gaussian_noise
from ingest.prompts import Prepared

if TYPE_CHECKING:
    import zarr

WRITE_THREADS = 4
# the residual entering layer 0: the (noised) token embedding a gaussian corruption records
EMBEDDED = resid_pre(0)
Shapes = dict[tuple[str, str], tuple[tuple[int, ...], str]]


def params_hash(params: dict) -> str:
    """The digest naming an ingest's parameters: equal parameters resume the same run."""
    return hashlib.sha256(json.dumps(params, sort_keys=True).encode()).hexdigest()[:16]


def array_shapes(model: ModelAdapter, params: dict, n: int, seq: int) -> Shapes:
    """Shape and dtype of every array of the run: hooks in the run's dtype, the rest exact."""
    out: Shapes = {}
    for side in SIDES:
        out[(side, "tokens")] = ((n, seq), "int32")
        if stores_logits(params):
            out[(side, LOGITS)] = ((n, model.shape.d_vocab), "float32")
        for hook in params["hooks"]:
            if hook != LOGITS:
                out[(side, hook)] = ((n, seq, *hook_shape(model, hook, seq)), params["dtype"])
    if params["corruption"] == "gaussian":
        out[("corrupted", "input_embeds")] = ((n, seq, model.shape.d_model), "float32")
    return out


def stores_logits(params: dict) -> bool:
    """Whether the run stores final-position logits: asked for, or a run recorded before
    logits could be derived (its parameters name no derived hooks)."""
    return LOGITS in params["hooks"] or "derived" not in params


def create_arrays(
    root: zarr.Group, group: str, shapes: Shapes, batch: int, replace: bool = True
) -> dict[tuple[str, str], zarr.Array]:
    """Create (or reopen) the arrays `group/<side>/<hook>`, one chunk per batch of prompts."""
    return {
        (side, hook): zarrays.create_array(root, f"{group}/{side}/{hook}", shape, batch, dtype,
                                           replace=replace)
        for (side, hook), (shape, dtype) in shapes.items()
    }  # fmt: skip


def write_chunks(
    store_dir: Path | ArraysRoot,
    arrays: dict[tuple[str, str], zarr.Array],
    values: dict[tuple[str, str], np.ndarray],
    chunk_idx: int,
    lo: int,
    hi: int,
) -> list[dict[str, Any]]:
    """Write one batch's chunk of each array, make it durable, return its ledger rows (by
    column, without the run id). Arrays are written on a few threads: compression, hashing and
    fsync release the GIL, and concurrent fsyncs share the file system's journal commits."""
    root = as_root(store_dir)

    def one(item: tuple[tuple[str, str], zarr.Array]) -> dict[str, Any]:
        (side, hook), arr = item
        data = values[(side, hook)].astype(arr.dtype, copy=False)
        arr[lo:hi] = data
        zarrays.make_durable(root, arr.path, chunk_idx, arr.ndim)
        checksum = zarrays.checksum(data)
        return {"side": side, "hook": hook, "chunk_idx": chunk_idx, "prompt_start": lo,
                "prompt_stop": hi, "checksum": checksum, "nbytes": data.nbytes}  # fmt: skip

    with ThreadPoolExecutor(WRITE_THREADS) as pool:
        return list(pool.map(one, arrays.items()))


def compute_batch(
    model: ModelAdapter, prep: Prepared, params: dict, lo: int, hi: int
) -> tuple[dict[tuple[str, str], np.ndarray], dict[str, np.ndarray]]:
    """Both sides' activations for prompts [lo, hi), and their per-prompt metrics."""
    import torch

    hooks = set(params["hooks"]) - {LOGITS}
    act_dtype = np.float16 if params["dtype"] == "float16" else np.float32
    last = torch.as_tensor(prep.lengths[lo:hi] - 1, dtype=torch.long)
    ans = torch.as_tensor(prep.answers[lo:hi], dtype=torch.long)
    sets = padded_sets(prep.answer_sets[lo:hi], prep.wrong_sets[lo:hi])
    answer_sets = AnswerSets.from_arrays(sets, 0, hi - lo, "cpu")
    values: dict[tuple[str, str], np.ndarray] = {}
    metrics: dict[str, np.ndarray] = {}
    for side in SIDES:
        tokens_np = (prep.clean if side == "clean" else prep.corrupted)[lo:hi]
        tokens = torch.as_tensor(tokens_np, dtype=torch.long, device=model.device)
        fwd_hooks = []
        if side == "corrupted" and params["corruption"] == "gaussian":
            noise = torch.zeros(hi - lo, tokens.shape[1], model.shape.d_model)
            for j, i in enumerate(range(lo, hi)):
                pos = prep.subjects[i]
                noise[j, pos] = gaussian_noise(
                    params["seed"], i, (len(pos), model.shape.d_model), params["noise_std"]
                )
            noise = noise.to(model.device)
            fwd_hooks.append(("hook_embed", lambda act, hook, _n=noise: act + _n))
            hooks_for_cache = hooks | {EMBEDDED}
        else:
            hooks_for_cache = hooks
        with torch.no_grad():
            logits, cache = model.run_with_cache(tokens, hooks_for_cache, fwd_hooks)
        rows = torch.arange(hi - lo)
        final = logits[rows, last.to(logits.device)].float().cpu()
        values[(side, "tokens")] = tokens_np.astype(np.int32)
        if stores_logits(params):
            values[(side, LOGITS)] = final.numpy()
        for hook in hooks:
            act = cache[hook].detach().float().cpu().numpy()
            if hook.endswith("hook_pattern") or hook.endswith("hook_attn_scores"):
                act = act.transpose(0, 2, 1, 3)  # (batch, head, q, k) -> (batch, q, head, k)
            values[(side, hook)] = act.astype(act_dtype)
        if side == "corrupted" and params["corruption"] == "gaussian":
            values[(side, "input_embeds")] = cache[EMBEDDED].detach().float().cpu().numpy()
        # The queries' metrics: the set logit difference is the patch query's clean endpoint.
        metrics[f"{side}_logit_diff"] = logit_diff(final, answer_sets).numpy()
        metrics[f"{side}_prob"] = answer_prob(final, ans).numpy()
    return values, metrics
