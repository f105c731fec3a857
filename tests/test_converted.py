"""Queries load a converted model (actstore/model/converted.py) without TransformerLens or
transformers, with the same results as through the bridge."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from edge_reference import hooked_circuit_metric

from actstore.core.store import Store
from actstore.model.adapter import load_model
from actstore.model.converted import converted_path, load_converted
from queries.attribution import attribute, score_graph, top_edges
from queries.patching import patch

ROOT = Path(__file__).parent.parent
QUERY = """
import json, sys, actstore
s = actstore.open(sys.argv[1])
p = s.patch(1, "head")
c = s.circuit(int(sys.argv[2]), edges=[3, 7])
print(json.dumps({"patch": p["value"].to_list(), "circuit": c["metric_value"].to_list()}))
"""


def test_converted_weights_equal_the_bridges(tmp_path):
    adapter = load_model("toy-random")
    from actstore.model.converted import save_converted

    assert save_converted(adapter) == converted_path(adapter.fingerprint)
    converted = load_converted(adapter.fingerprint)
    assert converted is not None and converted.architecture == adapter.architecture
    assert converted.shape == adapter.shape and converted.fingerprint == adapter.fingerprint
    ours, theirs = converted.weights(), adapter.weights()
    assert torch.equal(ours.W_E, theirs.W_E) and torch.equal(ours.W_U, theirs.W_U)
    for a, b in zip(ours.layers, theirs.layers, strict=True):
        for name in ("W_Q", "W_K", "W_V", "W_O", "W_in", "W_out", "b_O"):
            assert torch.equal(getattr(a, name), getattr(b, name)), name
        assert torch.equal(a.ln1.w, b.ln1.w) and torch.equal(a.ln2.b, b.ln2.b)
    assert load_converted("0" * 16) is None


@pytest.mark.slow
def test_uncached_queries_on_a_converted_store_import_no_bridge(tmp_path):
    from ingest.runner import ingest

    path = tmp_path / "store"
    ingest(Store(path, create=True), model="toy-random", task="ioi", n=8, batch_size=8)
    store = Store(path)
    assert converted_path(store.run(1)["params"]["fingerprint"]).exists()  # ingest converted it
    sid = int(attribute(store, 1, "eap")["score_id"][0])
    reference = Path(shutil.copytree(path, tmp_path / "reference"))
    adapter = load_model("toy-random")
    expected_patch = patch(Store(reference), 1, "head", model=adapter)["value"].to_list()
    out = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", QUERY, str(path), str(sid)],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    imported = _imports(out.stderr)
    assert "torch" in imported and "safetensors" in imported
    assert _bridge_imports(out.stderr) == []
    cli = subprocess.run(
        [sys.executable, "-X", "importtime", "-c", "from actstore.app.cli import main; main()",
         "circuit", str(path), "--scores", str(sid), "--edges", "4,9", "--format", "csv"],
        capture_output=True, text=True, check=True, cwd=ROOT,
    )  # fmt: skip
    assert _bridge_imports(cli.stderr) == [] and len(cli.stdout.strip().splitlines()) == 3
    got = json.loads(out.stdout)
    np.testing.assert_allclose(got["patch"], expected_patch, atol=1e-6)
    _, graph, values = score_graph(store, sid)
    prompts = store.prompts(1)
    data = {side: torch.as_tensor(store.read(1, side, "tokens"), dtype=torch.long)
            for side in ("clean", "corrupted")}  # fmt: skip
    data.update(
        {
            key: torch.as_tensor(prompts[col].to_numpy().copy(), dtype=torch.long)
            for key, col in (("answer", "answer_token"), ("wrong", "wrong_answer_token"))
        }
    )
    data["last"] = torch.as_tensor(prompts["seq_len"].to_numpy() - 1, dtype=torch.long)
    for n, value in zip((3, 7), got["circuit"], strict=True):
        mask = top_edges(graph, values, n, prune=True)
        assert value == pytest.approx(hooked_circuit_metric(adapter, data, mask), abs=1e-5)


def _imports(importtime: str) -> set[str]:
    """The modules a `python -X importtime` run imported, from its stderr."""
    return {line.split("|")[-1].strip() for line in importtime.splitlines()
            if line.startswith("import time:")}  # fmt: skip


def _bridge_imports(importtime: str) -> list[str]:
    return sorted(m for m in _imports(importtime)
                  if m.split(".")[0] in ("transformers", "transformer_lens"))  # fmt: skip


def test_equal_weights_of_another_architecture_are_not_the_runs_conversion(tmp_path, monkeypatch):
    """A tiny random Llama and Mistral of one seed have equal weights, so equal fingerprints
    (which sample the weights, not the attention): a query of the Mistral run loaded the Llama's
    converted file, without its sliding window, once the Llama had been converted (the family
    tests failed on Mistral after Llama). A file converted from another model is not used."""
    from families import save

    from actstore.model.converted import save_converted
    from queries.core import run_model

    monkeypatch.setenv("ACTSTORE_MODEL_CACHE", str(tmp_path / "cache"))
    llama, mistral = (load_model(str(save(f, tmp_path / f))) for f in ("llama", "mistral"))
    assert llama.fingerprint == mistral.fingerprint
    assert llama.architecture != mistral.architecture
    save_converted(llama)
    run_model._load.cache_clear()
    loaded = run_model._load(mistral.spec, None, mistral.fingerprint)
    run_model._load.cache_clear()
    assert loaded.architecture == mistral.architecture and loaded.architecture.sliding_window == 5
    converted = load_converted(llama.fingerprint, spec=llama.spec)
    assert converted is not None and converted.architecture == llama.architecture
