"""Stores for patching tests (IOI prompts of one template, so every prompt has the same length)
and the hooked full-forward reference of activation patching at a hook."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from reading import read_hook

from actstore.core.store import Store
from ingest.tasks import TASKS
from ingest.tasks.base import PromptPair
from ingest.tasks.ioi import IOI


def hooked_patching(model, function: str, tokens: torch.Tensor, cache, metric, **kwargs):
    """TransformerLens' activation patching `transformer_lens.patching.<function>` on the
    adapter's bridge: the exact reference that patching from the store is checked against."""
    import transformer_lens.patching as tlp

    return getattr(tlp, function)(model.bridge, tokens, cache, metric, **kwargs)


def logits_metric_fn(metric: str, finals: torch.Tensor, t):
    """A query metric as a function of full-sequence logits (B, seq, d_vocab) → mean over
    prompts: the form TransformerLens' patching functions take."""
    from actstore.model.metrics import from_logits

    rows = torch.arange(finals.shape[0])

    def fn(logits: torch.Tensor) -> torch.Tensor:
        return from_logits(metric, logits[rows, finals], t).mean()

    return fn


# `transformer_lens.patching` function and index axes of each patching component
TL_FUNCTIONS = {
    "head": ("get_act_patch_attn_head_out_all_pos", ("layer", "head_index")),
    "head-pos": ("get_act_patch_attn_head_out_by_pos", ("layer", "pos", "head_index")),
    "resid": ("get_act_patch_resid_pre", ("layer", "pos")),
    "attn-out": ("get_act_patch_attn_out", ("layer", "pos")),
    "mlp-out": ("get_act_patch_mlp_out", ("layer", "pos")),
}


class OneTemplateIOI:
    """IOI pairs of a single template (equal token lengths), for per-position parity tests."""

    name = "ioi-one-template"
    description = "IOI, template 0 only"

    def __init__(self, template: int = 0):
        self.template = template

    def generate(self, n: int, seed: int, model) -> list[PromptPair]:
        pairs = [p for p in IOI().generate(8 * n, seed, model)
                 if p.meta["template"] == self.template]  # fmt: skip
        return pairs[:n]


def ingest_pairs_task(path: Path, model, task, n: int, batch_size: int, **kwargs) -> Path:
    """Ingest `task` (any object with the task interface) under its name with `model` (a spec
    or a loaded adapter), then unregister it."""
    from ingest.runner import ingest

    TASKS[task.name] = task
    try:
        ingest(Store(path, create=True), model=model, task=task.name, n=n, batch_size=batch_size,
               **kwargs)  # fmt: skip
    finally:
        del TASKS[task.name]
    return path


def hooked_full_patch(model, s, hook: str, head: int | None) -> float:
    """Mean logit diff of corrupted prompts, `hook` set to its clean value, by a full forward."""
    prompts = s.prompts(1)
    tokens = torch.as_tensor(s.read(1, "corrupted", "tokens"), dtype=torch.long)
    layer = int(hook.split(".")[1])
    clean = read_hook(s, 1, "clean", hook, model)
    captured = {}

    def put(value, hook):
        if head is None:
            return clean.to(value.dtype)
        value = value.clone()
        value[:, :, head] = clean[:, :, head]
        return value

    if hook.endswith("hook_resid_mid"):  # the bridge's resid_mid hook feeds ln2 only
        hooks = [
            (f"blocks.{layer}.hook_resid_pre", lambda v, hook: captured.update(pre=v)),
            (f"blocks.{layer}.hook_attn_out", lambda v, hook: clean - captured["pre"]),
        ]
    else:
        hooks = [(hook, put)]
    with torch.no_grad():
        logits = model.hooked_logits(tokens, hooks)
    last = torch.as_tensor(prompts["seq_len"].to_numpy() - 1)
    final = logits[torch.arange(len(last)), last]
    answer = torch.tensor(prompts["answer_token"].to_list(), dtype=torch.long)
    wrong = torch.tensor(prompts["wrong_answer_token"].to_list(), dtype=torch.long)
    rows = torch.arange(len(last))
    return float((final[rows, answer] - final[rows, wrong]).mean())


def assert_matches_transformer_lens(
    store, model, component: str, direction: str, positions: list[int] | None, spread: float
) -> None:
    """Our effects of run 1 equal `transformer_lens.patching`'s for every metric (1e-4), and
    the logit differences vary by more than `spread` (the patches really change the run).
    Nothing here writes: the reads share one catalog connection."""
    with store.reading():
        _assert_matches(store, model, component, direction, positions, spread)


def _assert_matches(
    store, model, component: str, direction: str, positions: list[int] | None, spread: float
) -> None:
    import pandas as pd

    from actstore.core.choices import METRICS
    from actstore.model import metrics
    from queries.patching import compute_effects

    pr = store.prompts(1)
    tokens = {s: torch.tensor(store.read(1, s, "tokens")).long() for s in ("clean", "corrupted")}
    finals = torch.tensor(pr["seq_len"].to_numpy() - 1).long()
    targets = metrics.Targets(
        torch.tensor(pr["answer_token"].to_numpy()).long(),
        torch.tensor(pr["wrong_answer_token"].to_numpy()).long(),
        read_hook(store, 1, "clean", "logits", model),
    )
    fns = {m: logits_metric_fn(m, finals, targets) for m in METRICS}
    src, base = ("clean", "corrupted") if direction == "denoise" else ("corrupted", "clean")
    _, cache = model.run_with_cache(tokens[src])
    name, axes = TL_FUNCTIONS[component]
    s = model.shape
    if component == "head":
        rest = [(h,) for h in range(s.n_heads)]
    elif component == "head-pos":
        rest = [(p, h) for p in positions for h in range(s.n_heads)]
    else:
        rest = [(p,) for p in positions]
    index = pd.DataFrame([(layer, *r) for layer in range(s.n_layers) for r in rest],
                         columns=list(axes))  # fmt: skip
    result = hooked_patching(model, name, tokens[base], cache, fns, index_axis_names=None,
                             index_df=index)  # fmt: skip
    key = {"layer": "layer", "head_index": "head", "pos": "pos"}
    for i, metric in enumerate(METRICS):
        spec = absolute_spec(component, metric, direction, 1, positions)
        ours = compute_effects(store, 1, spec, model)[0].sort([key[a] for a in axes])
        expected = result.values[i].numpy()
        assert ours.height == len(expected)
        message = f"{model.spec} {component} {direction} {metric}"
        np.testing.assert_allclose(ours["value"].to_numpy(), expected, atol=1e-4, rtol=0,
                                   err_msg=message)  # fmt: skip
        if metric == "logit-diff":
            assert np.ptp(ours["value"].to_numpy()) > spread, message


def absolute_spec(component: str, metric: str, direction: str, window: int, positions):
    """A patch query at absolute positions whatever the prompts' lengths: what the engine
    computes (and TransformerLens' patching does), which `check_spec` refuses on runs of several
    lengths, where one position is a different token in each prompt."""
    from queries.patching.patch import PatchSpec

    return PatchSpec(component, metric, direction, window,
                     None if positions is None else tuple(sorted(set(positions))))  # fmt: skip
