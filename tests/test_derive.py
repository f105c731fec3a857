"""Derived activations equal what the model's own forward produced, on every family.

The reference is the bridge's hooked forward (`run_with_cache`) of tiny random models of every
supported family (tests/support/families.py) and the toy GPT-2: a Derivation that reads only the
lean set (z of every layer, every other residual, the final residual, tokens) must reproduce every
residual, resid_mid, attn_out, mlp_out and the final-position logits within 1e-5.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from families import FAMILIES, random_model

from actstore.core.store import Store
from actstore.model import derivable as names
from actstore.model.adapter import ModelAdapter, adapter_from_hf, load_model
from queries.core.derive import Derivation
from queries.core.engine import Engine

TOL = 1e-5
LENGTHS = (7, 5, 6)  # prompts of several lengths, right-padded: finals differ


def _model(family: str) -> ModelAdapter:
    if family == "gpt2":
        return load_model("toy", "cpu")
    hf, tok = random_model(family)
    return adapter_from_hf(family, hf, tok, "cpu")


def _reference(model: ModelAdapter) -> tuple[torch.Tensor, dict, torch.Tensor, torch.Tensor]:
    """Tokens, every standard hook of a hooked forward, final positions and final logits."""
    g = torch.Generator().manual_seed(1)
    seq = max(LENGTHS)
    tokens = torch.randint(2, 40, (len(LENGTHS), seq), generator=g)
    tokens[:, 0] = model.bos_id
    for row, n in enumerate(LENGTHS):
        tokens[row, n:] = model.pad_id
    wanted = {h for h in model.hook_names() if h.rsplit(".", 1)[-1] in HOOK_KINDS}
    with torch.no_grad():
        logits, cache = model.run_with_cache(tokens, wanted)
    finals = torch.tensor(LENGTHS) - 1
    final_logits = logits[torch.arange(len(LENGTHS)), finals]
    return tokens, cache, finals, final_logits


HOOK_KINDS = {"hook_resid_pre", "hook_resid_mid", "hook_resid_post", "hook_attn_out",
              "hook_mlp_out", "hook_z"}  # fmt: skip


def _lean(model: ModelAdapter, every: int) -> set[str]:
    n = model.shape.n_layers
    return ({names.z(i) for i in range(n)} | {names.resid_post(n - 1), names.TOKENS}
            | {names.resid_pre(i) for i in range(every, n, every)})  # fmt: skip


@pytest.fixture(scope="module", params=("gpt2", *FAMILIES))
def family(request):
    model = _model(request.param)
    return model, Engine.from_adapter(model), *_reference(model)


@pytest.mark.parametrize("every", [2, 3, 100])
def test_every_derivable_hook_equals_the_forward(family, every):
    """Stored every 2nd / 3rd residual, or none but the final one (a chain through all layers):
    everything `derivable` names is what the forward computed."""
    model, engine, tokens, cache, finals, final_logits = family
    stored = _lean(model, every)
    arch = model.architecture

    def read(hook: str) -> torch.Tensor | None:
        if hook not in stored:
            return None
        return tokens if hook == names.TOKENS else cache[hook].float()

    d = Derivation(engine, read, finals)
    derived = names.derivable(stored, arch.n_layers, arch.parallel)
    assert names.LOGITS in derived
    assert all(names.resid_pre(i) in derived for i in range(arch.n_layers) if i % every)
    checked = 0
    for hook in derived:
        with torch.no_grad():
            got = d.get(hook)
        want = final_logits if hook == names.LOGITS else cache[hook]
        if hook != names.LOGITS and hook not in cache:
            continue  # a hook this family's bridge does not have
        diff = (got - want).abs().max().item()
        assert diff <= TOL * max(1.0, want.abs().max().item()), (hook, diff)
        checked += 1
    mids = sum(names.resid_mid(i) in cache for i in range(arch.n_layers))
    assert checked == len(derived) and mids == (0 if arch.parallel else arch.n_layers)


def test_stored_hooks_are_read_verbatim_and_only_once(family):
    """A run that stores everything (the layout before derivation) is read as stored."""
    model, engine, tokens, cache, finals, _ = family
    reads: list[str] = []

    def read(hook: str) -> torch.Tensor | None:
        reads.append(hook)
        return tokens if hook == names.TOKENS else cache.get(hook)

    d = Derivation(engine, read, finals)
    for hook in sorted(cache):
        assert d.get(hook) is cache[hook]
        assert d.get(hook) is cache[hook]
    assert sorted(reads) == sorted(cache)


def test_what_cannot_be_derived_is_named():
    model = load_model("toy", "cpu")
    n = model.shape.n_layers
    stored = {names.TOKENS, names.resid_post(n - 1)}  # no z: no residual after layer 0
    assert names.derivable(stored, n, parallel=False) == [names.resid_pre(0), names.LOGITS]
    d = Derivation(Engine.from_adapter(model), lambda hook: None)
    with pytest.raises(KeyError, match="cannot be derived"):
        d.get("blocks.0.mlp.hook_post")


def test_default_hooks_are_the_lean_set_and_full_stores_everything(toy_random):
    """No --hooks means `default`, which is `lean`: of what the queries read it stores only
    every 2nd residual (so a derived one costs one MLP) and determines the rest; `full` stores
    them all, logits included; a set without the final residual stores the logits (it cannot
    derive them)."""
    from actstore.model.hooks import layer_hooks
    from ingest.layout import resolve_hooks

    n = toy_random.shape.n_layers
    default = resolve_hooks(toy_random, None)
    assert default == resolve_hooks(toy_random, "default") == resolve_hooks(toy_random, "lean")
    full = resolve_hooks(toy_random, "full")
    read_by_queries = {
        h
        for i in range(n)
        for h in (names.resid_pre(i), names.resid_mid(i), names.attn_out(i), names.mlp_out(i))
    }
    assert names.LOGITS in full and {names.resid_mid(1), names.mlp_out(1)} <= set(full)
    stored_residuals = {names.resid_pre(i) for i in range(2, n, 2)}
    assert set(default) & (read_by_queries | {names.LOGITS}) == stored_residuals
    derived = names.derivable([*default, names.TOKENS], n, parallel=False)
    assert read_by_queries | {names.LOGITS} <= set(default) | set(derived)
    assert set(full) - set(default) <= set(derived)
    widened = resolve_hooks(toy_random, "default,mlp_post")
    assert set(widened) == set(default) | set(layer_hooks("mlp_post", n))
    assert resolve_hooks(toy_random, "z") == [*(names.z(i) for i in range(n)), names.LOGITS]


# ---- a lean run against a full one --------------------------------------------------------


def _ingest(path, toy_random, hooks: str | None, dtype: str):
    """The module's Gaussian-noise IOI prompts (the same in every call) ingested with `hooks`
    in `dtype`; returns the Store."""
    from ingest.runner import ingest

    ingest(Store(path, create=True), model=toy_random, task="ioi", n=6, batch_size=4, hooks=hooks,
           corruption="gaussian", dtype=dtype)  # fmt: skip
    return Store(path)


def _ingest_pair(root, toy_random):
    """The same prompts ingested with the default hooks, the lean set, and with --hooks full,
    the layout of stores written before derivation (both float32)."""
    return (_ingest(root / "lean", toy_random, None, "float32"),
            _ingest(root / "full", toy_random, "full", "float32"))  # fmt: skip


@pytest.fixture(scope="module")
def pair(tmp_path_factory, toy_random):
    """The float32 lean and full runs (`_ingest_pair`), ingested once for the module: (root,
    lean Store, full Store). Read only; a test that records queries works on `pair_copy`."""
    root = tmp_path_factory.mktemp("pair")
    return root, *_ingest_pair(root, toy_random)


@pytest.fixture
def pair_copy(pair, tmp_path):
    """A test's own copy of the module's lean and full runs (it records queries in them)."""
    import shutil

    for name in ("lean", "full"):
        shutil.copytree(pair[0] / name, tmp_path / name)
    return tmp_path


def _largest_error(lean, full, model) -> float:
    """max |derived from the lean run − stored in the full run| over every hook, both sides,
    relative to the hook's largest magnitude."""
    engine = Engine.from_adapter(model)
    finals = torch.as_tensor(lean.prompts(1)["seq_len"].to_numpy() - 1, dtype=torch.long)
    stored = set(lean.hooks(1, "clean")) | set(lean.hooks(1, "corrupted"))
    worst = 0.0
    for side in ("clean", "corrupted"):

        def read(hook: str, _side=side) -> torch.Tensor | None:
            if hook not in stored or hook not in lean.hooks(1, _side):
                return None
            return torch.as_tensor(lean.read(1, _side, hook).astype("float32"))

        d = Derivation(engine, read, finals)
        for hook in full.hooks(1, side):
            want = torch.as_tensor(full.read(1, side, hook).astype("float32"))
            with torch.no_grad():
                got = d.get(hook).float()
            worst = max(worst, ((got - want).abs().max() / want.abs().max().clamp(min=1)).item())
    return worst


def test_lean_run_stores_less_and_derives_the_full_run(pair, toy_random):
    """Every hook of a full run (and its logits, and the noised side's input embeddings) is
    derived from a lean run of the same prompts within 1e-5; the catalog says what is derived."""
    from actstore.core.errors import UsageError

    _, lean, full = pair
    n = toy_random.shape.n_layers
    assert set(lean.hooks(1, "clean")) == (
        {names.z(i) for i in range(n)} | {names.resid_pre(i) for i in range(2, n, 2)}
        | {names.resid_post(n - 1), names.TOKENS}
    )  # fmt: skip
    assert names.INPUT_EMBEDS in lean.hooks(1, "corrupted")
    assert _largest_error(lean, full, toy_random) <= TOL
    params = lean.run(1)["params"]
    assert names.LOGITS in params["derived"] and names.resid_mid(1) in params["derived"]
    info = {s: store.info().row(0, named=True) for s, store in (("lean", lean), ("full", full))}
    assert info["lean"]["n_derived"] == len(params["derived"])
    assert info["lean"]["bytes_per_prompt"] < 0.5 * info["full"]["bytes_per_prompt"]
    assert info["lean"]["bytes_per_prompt"] == round(info["lean"]["stored_bytes"] / 6)
    with pytest.raises(UsageError, match="derived on read") as err:
        lean.read(1, "clean", names.resid_mid(1))
    assert "\n" not in str(err.value)


def test_read_derives_a_derived_hook_when_asked(pair):
    """`read(..., derive=True)` computes a derived hook with the run's model, equal to the full
    run's stored one; without it the error names that call and the --hooks spelling that keeps
    the default set (a bare hook name would store only that hook)."""
    import actstore
    from actstore.core.errors import UsageError

    root, _, full = pair
    lean = actstore.open(str(root / "lean"))
    hook = names.resid_mid(1)
    with pytest.raises(UsageError) as err:
        lean.read(1, "clean", hook)
    assert f"actstore.open(path).read(1, 'clean', {hook!r}, derive=True)" in str(err.value)
    assert f"--hooks default,{hook}" in str(err.value)
    got = lean.read(1, "clean", hook, 1, 5, derive=True)
    want = full.read(1, "clean", hook, 1, 5).astype("float32")
    assert got.shape == want.shape and got.dtype == np.float32
    assert np.abs(got - want).max() / np.abs(want).max() <= TOL
    stored = names.z(0)  # a stored hook is read as stored, derive or not
    assert np.array_equal(lean.read(1, "clean", stored, derive=True), lean.read(1, "clean", stored))


def test_float16_lean_run_error_against_float32(pair, tmp_path, toy_random):
    """float16 storage: derived activations stay within 1e-2 of the float32 run's, relative to
    each hook's magnitude (the README states the measured figure)."""
    lean, full = _ingest(tmp_path / "lean", toy_random, None, "float16"), pair[2]
    error = _largest_error(lean, full, toy_random)
    print(f"float16 lean vs float32 full: largest relative error {error:.1e}")
    assert 1e-5 < error < 1e-2


# ---- queries read lean runs through the reader ------------------------------------------------


def test_queries_on_a_lean_run_equal_the_full_run(pair_copy, toy_random):
    """Patching (heads, resid_pre, mlp_out), attribution (EAP) and subspace patching read a
    lean run through the reader and give the full run's results within 1e-5."""
    import actstore

    lean, full = actstore.open(pair_copy / "lean"), actstore.open(pair_copy / "full")

    def same(a, b, key: list[str], value: str) -> None:
        a, b = a.sort(key), b.sort(key)
        assert a.select(key).equals(b.select(key))
        assert np.abs(a[value].to_numpy() - b[value].to_numpy()).max() <= TOL

    for component in ("head", "resid", "mlp-out"):
        same(lean.patch(1, component, model=toy_random), full.patch(1, component, model=toy_random),
             ["layer", "head", "pos", "metric"], "value")  # fmt: skip
    same(lean.attribute(1, "eap"), full.attribute(1, "eap"), ["src", "dst", "qkv"], "score")
    hook = names.resid_mid(1)
    same(lean.subspace(1, hook, "mean-diff", pos="final"),
         full.subspace(1, hook, "mean-diff", pos="final"), ["component"], "value")  # fmt: skip


def test_reduce_on_a_lean_run_equals_the_full_run(pair_copy):
    """`reduce` of hooks a lean run derives (resid_mid, mlp_out per group, an odd layer's
    resid_pre on the noised side) equals the full run's, which stores them, within 1e-5; the
    derived array Dask reads survives pickling (for its workers)."""
    import pickle

    import actstore
    from actstore.core.errors import UsageError
    from queries.core.reader import DerivedArray

    lean, full = actstore.open(pair_copy / "lean"), actstore.open(pair_copy / "full")
    derived = lean.run(1)["params"]["derived"]
    for hook, op, side in [(names.resid_mid(1), "mean", "clean"),
                           (names.mlp_out(0), "class-mean", "clean"),
                           (names.resid_pre(1), "mean", "corrupted")]:  # fmt: skip
        assert hook in derived and hook not in lean.hooks(1, side)
        assert hook in full.hooks(1, side)
        a = lean.reduce(1, hook, op, side=side).sort(["grp", "pos", "idx"])
        b = full.reduce(1, hook, op, side=side).sort(["grp", "pos", "idx"])
        assert a.height == b.height > 0
        assert a.select("grp", "pos", "idx", "n").equals(b.select("grp", "pos", "idx", "n"))
        assert np.abs(a["value"].to_numpy() - b["value"].to_numpy()).max() <= TOL
    hook = names.resid_mid(1)
    copy = pickle.loads(pickle.dumps(DerivedArray(lean, 1, "clean", hook)))
    assert copy.shape == full.array(1, "clean", hook).shape
    assert np.abs(copy[2:5] - full.read(1, "clean", hook, 2, 5)).max() <= TOL
    with pytest.raises(UsageError, match="head-norm needs a per-head hook"):
        lean.reduce(1, hook, "head-norm")
