"""Patching: parity with transformer_lens.patching, fast paths vs the slow exact path, recording."""

from __future__ import annotations

import io
import resource
import subprocess
import sys

import numpy as np
import polars as pl
import pytest
import torch
from cli_process import run_cli
from families import randomise_norms
from patching_helpers import (
    TL_FUNCTIONS,
    OneTemplateIOI,
    absolute_spec,
    assert_matches_transformer_lens,
    ingest_pairs_task,
)

from actstore.core.errors import UsageError
from actstore.core.store import Store
from actstore.model.adapter import load_model
from actstore.model.model_spec import BUILTIN_DIR, RANDOM_SUFFIX, builtin_names
from queries.patching import check_spec, compute_effects, patch

N_PROMPTS = 5


def available_builtins() -> list:
    """Built-in models that can load here: every -random twin (its norm weights and biases
    randomised: a fresh model's 1 and 0 hide a kernel that ignores them), and the trained ones
    with weights, in the slow tier (the twins have the same architectures)."""

    def loadable(name: str) -> bool:
        return name.endswith(RANDOM_SUFFIX) or (BUILTIN_DIR / name / "model.safetensors").exists()

    return [n if n.endswith(RANDOM_SUFFIX) else pytest.param(n, marks=pytest.mark.slow)
            for n in builtin_names() if loadable(n)]  # fmt: skip


def random_norms(spec: str):
    """The built-in model `spec`, with randomised norm weights and biases when it is a -random
    twin."""
    model = load_model(spec)
    if spec.endswith(RANDOM_SUFFIX):
        torch.manual_seed(0)
        randomise_norms(model.bridge.original_model)
    return model


def _equal_store(tmp_path_factory, model) -> tuple:
    """(store path, adapter): one IOI template, so all prompts share their length."""
    path = tmp_path_factory.mktemp("patch") / "store"
    ingest_pairs_task(path, model, OneTemplateIOI(), n=N_PROMPTS, batch_size=3)
    return path, model


@pytest.fixture(scope="module", params=available_builtins())
def equal_store(request, tmp_path_factory):
    """An equal-length store of each built-in model as it loads."""
    return _equal_store(tmp_path_factory, load_model(request.param))


@pytest.fixture(scope="module", params=available_builtins())
def parity_store(request, tmp_path_factory):
    """An equal-length store of each built-in model, the twins' norms randomised."""
    return _equal_store(tmp_path_factory, random_norms(request.param))


@pytest.mark.cover(2)
@pytest.mark.parametrize("direction", ["denoise", "noise"])
@pytest.mark.parametrize("component", list(TL_FUNCTIONS))
def test_matches_transformer_lens(parity_store, component, direction):
    """Every metric of every component equals TL's patching within 1e-4 (positions sampled
    for the by-position sweeps to keep TL's one-forward-per-patch cost small)."""
    path, model = parity_store
    store = Store(path)
    seq = int(store.run(1)["seq_len"])
    positions = None if component == "head" else [0, 4, seq - 2, seq - 1]
    assert_matches_transformer_lens(store, model, component, direction, positions, spread=0.0)


@pytest.mark.slow
@pytest.mark.parametrize("window", [1, 2])
@pytest.mark.parametrize("component", ["head", "head-pos", "resid", "attn-out", "mlp-out"])
def test_fast_paths_equal_full_forward(ioi_store, toy_random, component, window):
    """KV reuse vs full suffix vs a hooked full forward, on prompts of different lengths (IOI's
    templates differ), including positions past some prompts' final position."""
    store = Store(ioi_store)
    seq = int(store.run(1)["seq_len"])
    positions = None if component == "head" else [0, 9, 14, seq - 1]
    specs = [absolute_spec(component, "kl", "denoise", window, positions)]
    if component != "head":  # by role: each prompt patched at its own position of the role
        specs.append(check_spec(store, 1, component, "kl", "denoise", window, "IO,S1+1,END"))
    for spec in specs:
        frames = {e: compute_effects(store, 1, spec, toy_random, engine=e, batch_size=8)[0]
                  for e in ("downstream", "downstream-no-kv", "full-forward")}  # fmt: skip
        ref = frames["full-forward"]["value"].to_numpy()
        assert np.ptp(ref) > 0
        for engine in ("downstream", "downstream-no-kv"):
            values = frames[engine]["value"].to_numpy()
            np.testing.assert_allclose(values, ref, atol=1e-5, rtol=0)


def test_fast_path_does_less_work(ioi_store, toy_random):
    """KV reuse computes strictly fewer FLOPs than recomputing every position downstream."""
    store = Store(ioi_store)
    spec = check_spec(store, 1, "resid", "logit-diff", "noise", 1, None)
    _, fast = compute_effects(store, 1, spec, toy_random, engine="downstream")
    _, full = compute_effects(store, 1, spec, toy_random, engine="downstream-no-kv")
    assert fast < 0.75 * full


@pytest.mark.parametrize(("component", "window"), [("head", 1), ("head-pos", 2), ("resid", 1)])
def test_chosen_layers_are_rows_of_the_whole_sweep(ioi_store, toy_random, component, window):
    """`layers` keeps only those layers' rows, each equal to the whole sweep's, for less work;
    layers outside the model's full windows are refused before any work."""
    store = Store(ioi_store)
    positions = None if component == "head" else ["IO", "S2"]
    whole, all_flops = compute_effects(
        store, 1, check_spec(store, 1, component, "kl", "noise", window, positions), toy_random
    )
    spec = check_spec(store, 1, component, "kl", "noise", window, positions, [2, 1, 2])
    assert spec.layers == (1, 2) and spec.params()["layers"] == [1, 2]
    assert "layers" not in check_spec(store, 1, component, "kl", "noise", 1, positions).params()
    some, flops = compute_effects(store, 1, spec, toy_random)
    assert some["layer"].unique().sort().to_list() == [1, 2]
    expected = whole.filter(pl.col("layer").is_in([1, 2]))
    keys = ("layer", "head", "pos", "role")
    assert some.select(keys).equals(expected.select(keys))
    np.testing.assert_allclose(some["value"].to_numpy(), expected["value"].to_numpy(), atol=1e-6)
    assert flops < all_flops
    last = toy_random.shape.n_layers - window
    with pytest.raises(UsageError, match=rf"layers \[{last + 1}\]: give layers in 0\.\.{last}"):
        check_spec(store, 1, component, "kl", "noise", window, positions, [0, last + 1])


def test_normalized_and_unaffected_position(equal_store):
    """Position 0 (BOS) is equal in both runs: patching it leaves the corrupted metric, so the
    normalised effect is 0. The query computes its clean and corrupted ends from the store (float32,
    like its patched values): they equal the ingest's logit differences within the parity
    tolerance, not to the last bit."""
    path, model = equal_store
    store = Store(path)
    df = patch(store, 1, "resid", positions=[0, 3], model=model)
    pr = store.prompts(1)
    m_clean, m_corr = pr["clean_logit_diff"].mean(), pr["corrupted_logit_diff"].mean()
    expected = (df["value"] - m_corr) / (m_clean - m_corr)
    np.testing.assert_allclose(df["normalized"].to_numpy(), expected.to_numpy(), atol=1e-4)
    at_bos = df.filter(pl.col("pos") == 0)
    np.testing.assert_allclose(at_bos["value"].to_numpy(), m_corr, atol=1e-4)
    np.testing.assert_allclose(at_bos["normalized"].to_numpy(), 0.0, atol=1e-4)


def test_query_recorded_once_and_recompute(ioi_copy, toy_random):
    store = Store(ioi_copy)
    first = patch(store, 1, "head", metric="prob", model=toy_random)
    again = patch(store, 1, "head", metric="prob")
    assert first.equals(again)
    assert list(first.columns) == ["query_id", "layer", "head", "pos", "role", "metric", "value",
                                   "normalized", "importance"]  # fmt: skip
    assert first["importance"].to_list() == first["normalized"].abs().to_list()  # denoising
    s = toy_random.shape
    assert first.height == s.n_layers * s.n_heads and first["pos"].is_null().all()
    fresh = patch(store, 1, "head", metric="prob", recompute=True, model=toy_random)
    assert fresh["query_id"][0] > first["query_id"][0]
    np.testing.assert_allclose(fresh["value"].to_numpy(), first["value"].to_numpy(), atol=1e-7)
    row = store.query("SELECT * FROM queries WHERE query_id = ?", [int(fresh["query_id"][0])])
    assert row["kind"][0] == "patch" and row["wall_s"][0] > 0


def _cli(*args: str) -> subprocess.CompletedProcess:
    """Run the CLI in a fresh interpreter that logs every module it imports (-X importtime)."""
    return run_cli(*args, python_args=["-X", "importtime"], timeout=300)


def _children_cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def _timed(*args: str) -> tuple[subprocess.CompletedProcess, float]:
    before = _children_cpu()
    done = _cli(*args)
    return done, _children_cpu() - before


def _imported(done: subprocess.CompletedProcess) -> set[str]:
    return {line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines()
            if line.startswith("import time:")}  # fmt: skip


def _without_torch(args: list[str]) -> subprocess.CompletedProcess:
    """The CLI run in process in a fresh interpreter, which fails if torch was imported; its
    stdout is the command's."""
    probe = (
        "import sys; from click.testing import CliRunner; from actstore.app.cli import main; "
        f"r = CliRunner().invoke(main, {args!r}); assert r.exit_code == 0, r.output; "
        "assert 'torch' not in sys.modules, 'torch imported'; sys.stdout.write(r.stdout)"
    )
    return subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True)


def test_cached_patch_answers_without_torch(ioi_copy, toy_random):
    """A patch query recorded once is answered by the CLI, in a fresh interpreter, from the
    store: the same rows, no torch imported."""
    from actstore.core.output import write_rows

    frame = patch(Store(ioi_copy), 1, "mlp-out", model=toy_random)
    args = ["patch", str(ioi_copy), "--run", "1", "--component", "mlp-out", "--format", "csv"]
    check = _without_torch(args)
    assert check.returncode == 0, check.stderr
    header = "query_id,layer,head,pos,role,metric,value,normalized,importance"
    assert check.stdout.splitlines()[0] == header
    printed = io.StringIO()
    write_rows(frame, "csv", printed)
    assert check.stdout == printed.getvalue() and frame.height > 0


@pytest.mark.slow
def test_cli_repeat_is_fast_without_torch(ioi_copy):
    args = ("patch", str(ioi_copy), "--run", "1", "--component", "mlp-out", "--format", "csv")
    first = _cli(*args)
    assert first.returncode == 0, first.stderr
    assert "torch" in _imported(first)  # the first call computes
    header = first.stdout.splitlines()[0]
    assert header == "query_id,layer,head,pos,role,metric,value,normalized,importance"
    again, cpu = _timed(*args)
    assert again.returncode == 0 and again.stdout == first.stdout
    assert not {m for m in _imported(again) if m.split(".")[0] in ("torch", "transformer_lens")}
    # A cached answer costs what a read-only command costs (interpreter, polars, DuckDB), not
    # the model's: importing torch alone takes about three times that. Both are measured here,
    # in the same conditions, because the machine running the tests may be shared.
    info, baseline = _timed("info", str(ioi_copy))
    assert info.returncode == 0, info.stderr
    assert cpu < 1.5 * baseline, f"repeated query used {cpu:.2f} s CPU, info {baseline:.2f} s"
    check = _without_torch(list(args))
    assert check.returncode == 0, check.stderr


@pytest.mark.slow
@pytest.mark.parametrize(
    ("extra", "code", "message"),
    [
        (("--component", "neuron"), 2, "--component"),
        (("--component", "head", "--window", "0"), 2, "--window 0"),
        (("--component", "resid", "--run", "9"), 2, "run 9 is not in"),
    ],
)
def test_bad_input_one_line(ioi_store, extra, code, message):
    before = Store(ioi_store).query("SELECT count(*) AS n FROM queries")["n"][0]
    args = ["patch", str(ioi_store), "--run", "1", *extra]
    result = _cli(*args)
    assert result.returncode == code
    errors = [line for line in result.stderr.splitlines() if line.lower().startswith("error")]
    assert len(errors) == 1 and message in errors[0], result.stderr
    assert "Traceback" not in result.stderr
    assert Store(ioi_store).query("SELECT count(*) AS n FROM queries")["n"][0] == before
