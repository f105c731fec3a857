"""Every option is range-checked before any work: one line, exit 2, the store as it was; the
ingest's checks before torch is imported."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys

import pytest
from click.testing import CliRunner
from test_bad_input import assert_refused
from test_cli import snapshot

from actstore.app.cli import main

INGEST = ["--model", "toy-random", "--task", "ioi", "--n", "4"]


@pytest.fixture(scope="module")
def model_dirs(tmp_path_factory, toy_random):
    """A small GPT-2 directory as save_pretrained writes it, a copy with its weights cut short,
    and copies whose config.json disagrees with the weights (layers; width)."""
    from transformers import GPT2Config, GPT2LMHeadModel

    base = tmp_path_factory.mktemp("models")
    good = base / "good"
    config = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_inner=64,
                        vocab_size=len(toy_random.tokenizer), n_positions=64)  # fmt: skip
    GPT2LMHeadModel(config).save_pretrained(good)
    toy_random.tokenizer.save_pretrained(good)
    cut = shutil.copytree(good, base / "cut")
    weights = cut / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    dirs = {"good": good, "cut": cut}
    for name, change in [("layers", {"n_layer": 3}), ("width", {"n_embd": 64})]:
        other = shutil.copytree(good, base / name)
        doc = json.loads((other / "config.json").read_text())
        (other / "config.json").write_text(json.dumps({**doc, **change}))
        dirs[name] = other
    return dirs


# Runs each command line in one fresh process, noting whether torch was imported by then.
REFUSE = """
import json, sys
from click.testing import CliRunner
from actstore.app.cli import main
out = []
for args in json.loads(sys.argv[1]):
    r = CliRunner().invoke(main, args)
    out.append([r.exit_code, r.stderr, 'torch' in sys.modules])
print(json.dumps(out))
"""


def refused_before_torch(commands: list[list[str]], messages: list[str]) -> None:
    """Each command exits 2 with one line holding its message, torch never imported."""
    res = subprocess.run([sys.executable, "-c", REFUSE, json.dumps(commands)],
                         capture_output=True, text=True, timeout=120)  # fmt: skip
    results = json.loads(res.stdout)
    for args, message, (code, stderr, torch_loaded) in zip(commands, messages, results,
                                                           strict=True):  # fmt: skip
        lines = stderr.strip().splitlines()
        assert code == 2 and len(lines) == 1 and message in lines[0], (args, stderr)
        assert not torch_loaded, args


def test_ingest_options_out_of_range_are_refused_before_torch(tmp_path, model_dirs):
    """--hooks '', a resid_pre stride beyond any model, --restart with --again, a model
    directory whose weights are cut short or disagree with its config: exit 2, one line, torch
    not imported, nothing written."""
    store = tmp_path / "s"
    cases = [
        ([*INGEST, "--hooks", ""], "--hooks is empty"),
        ([*INGEST, "--hooks", "resid_pre/99999999999999999999"], "give resid_pre/K with K"),
        ([*INGEST, "--restart", "--again"], "give --restart or --again, not both"),
        (["--model", str(model_dirs["cut"]), "--task", "ioi"], "model.safetensors is damaged or "
         "cut short"),
        (["--model", str(model_dirs["layers"]), "--task", "ioi"], "config.json says 3 layers, "
         "the weights hold 2"),
        (["--model", str(model_dirs["width"]), "--task", "ioi"], "width 64, but the weights' "
         "token embedding is"),
    ]  # fmt: skip
    refused_before_torch([["ingest", str(store), *args] for args, _ in cases],
                         [message for _, message in cases])  # fmt: skip
    assert not store.exists()


def test_a_sound_model_directory_passes_the_weight_check(model_dirs):
    from actstore.model.model_spec import check_model_spec

    assert check_model_spec(str(model_dirs["good"])) == "path"


def test_a_stride_as_long_as_the_model_is_refused_once_it_loads(tmp_path, session_ingest):
    res = CliRunner().invoke(main, ["ingest", str(tmp_path / "s"), *INGEST,
                                    "--hooks", "z,resid_pre/4"])  # fmt: skip
    assert_refused(res, 2, "toy-random has 4 layers, so resid_pre/4 names none; give K from 1 to 3")


QUERY_CASES = [
    (["attribute", "--run", "1", "--method", "eap", "--top", "-1"], "-1 is not in the range"),
    (["attribute", "--run", "1", "--method", "eap-ig", "--steps", "1000000000"],
     "--steps 1000000000: give 1 to 1000"),
    (["circuit", "--scores", "1", "--faithfulness", "-0.5"], "--faithfulness -0.5: give"),
    (["circuit", "--scores", "1", "--faithfulness", "1.5"], "--faithfulness 1.5: give"),
    (["subspace", "--run", "1", "--hook", "blocks.1.hook_resid_pre", "--basis", "das",
      "--lr", "nan"], "--lr nan: give a positive learning rate"),
    (["subspace", "--run", "1", "--hook", "blocks.1.hook_resid_pre", "--basis",
      "mean-diff", "--k", "1000"], "--k 1000: blocks.1.hook_resid_pre has 64 dimensions"),
    (["subspace", "--run", "1", "--hook", "blocks.1.attn.hook_z", "--head", "0",
      "--basis", "das", "--k", "17"], "blocks.1.attn.hook_z has 16 dimensions"),
]  # fmt: skip


def test_query_options_out_of_range_are_refused_before_torch(ioi_store):
    """attribute, circuit and subspace refuse these before the model loads (torch not
    imported), in one line, the store as it was."""
    before = snapshot(ioi_store)
    refused_before_torch([[args[0], str(ioi_store), *args[1:]] for args, _ in QUERY_CASES],
                         [message for _, message in QUERY_CASES])  # fmt: skip
    assert snapshot(ioi_store) == before
