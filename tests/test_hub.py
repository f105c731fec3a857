"""A hub model with no network fails in one line within seconds, before torch is imported, and
says how to use a local directory or the Hugging Face cache; device names are checked too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from actstore.core.errors import UsageError
from actstore.model import hub

ROOT = Path(__file__).resolve().parent.parent
PROBE = (
    "import json, sys, time\n"
    "from click.testing import CliRunner\n"
    "from actstore.app.cli import main\n"
    "t = time.perf_counter()\n"
    "r = CliRunner().invoke(main, ['ingest', sys.argv[1], '--model', 'gpt2', '--task', 'ioi'])\n"
    "print(json.dumps([r.exit_code, r.stderr, time.perf_counter() - t, 'torch' in sys.modules]))\n"
)


def ingest_gpt2(tmp_path: Path, **env: str) -> tuple[int, str, float, bool]:
    base = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE",
                                                              "TRANSFORMERS_OFFLINE")}  # fmt: skip
    base["HF_HUB_CACHE"] = str(tmp_path / "hf-cache")  # an empty cache
    res = subprocess.run([sys.executable, "-c", PROBE, str(tmp_path / "s")], capture_output=True,
                         text=True, env={**base, **env}, cwd=ROOT)  # fmt: skip
    return tuple(json.loads(res.stdout))


@pytest.mark.parametrize(
    ("env", "why"),
    [({"HF_HUB_OFFLINE": "1"}, "the Hugging Face hub is switched off here (HF_HUB_OFFLINE=1)"),
     ({"HF_ENDPOINT": "http://127.0.0.1:9"},
      "the Hugging Face hub (http://127.0.0.1:9) could not be reached")],
)  # fmt: skip
def test_hub_model_without_the_hub_is_one_line_within_seconds(tmp_path, env, why):
    code, stderr, seconds, torch_imported = ingest_gpt2(tmp_path, **env)
    assert code == 1
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and why in lines[0], stderr
    assert "does not hold it" in lines[0] and "--model /path/to/model-dir" in lines[0]
    assert not torch_imported and seconds < 10, seconds
    assert not (tmp_path / "s").exists()


def test_a_cached_model_loads_offline_when_the_hub_is_unreachable(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_CACHE", str(tmp_path))
    monkeypatch.delenv("HF_HUB_OFFLINE", raising=False)
    monkeypatch.delenv("TRANSFORMERS_OFFLINE", raising=False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")
    (tmp_path / "models--openai-community--gpt2").mkdir()
    started = time.perf_counter()
    hub.check_reachable("gpt2")  # no error: the cache has it
    assert time.perf_counter() - started < 5
    assert os.environ["HF_HUB_OFFLINE"] == "1"  # and transformers will not retry the hub
    assert hub.cached("openai-community/gpt2") and not hub.cached("gpt2-medium")


def test_device_names_are_checked():
    from actstore.model.adapter import check_device_name, resolve_device

    for good in (None, "cpu", "cuda", "cuda:1", "auto", "mps"):
        check_device_name(good)
    with pytest.raises(UsageError, match="--device gpu: not a device"):
        check_device_name("gpu")
    import torch

    if not torch.cuda.is_available():
        with pytest.raises(UsageError, match="--device cuda:0: CUDA is not available here"):
            resolve_device("cuda:0")
    assert resolve_device("cpu") == "cpu"
