"""The model spec: which model `--model` names, and whether it can load, checked without torch.

A spec is a built-in toy (`toy`, `toy-...`, each with its `-random` twin), a Hugging Face model
directory, or a hub name. `check_model_spec` says which, and refuses what cannot load before any
work: an unknown built-in, a directory without config.json or with weight files cut short or
from another model (`check_weight_files` reads only the safetensors headers), a missing path, a
hub name the hub and the cache cannot give. The adapter (actstore.model.adapter) loads it.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from actstore.core.errors import ActstoreError, UsageError
from actstore.model import hub

BUILTIN_DIR = Path(__file__).parent / "builtin"
RANDOM_SUFFIX = "-random"


def builtin_names() -> list[str]:
    """Names of the built-in models: every shipped directory, plus its `-random` twin."""
    names = sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "config.json").exists())
    return names + [n + RANDOM_SUFFIX for n in names]


def check_model_spec(spec: str) -> str:
    """Where `spec` loads from ("builtin", "path" or "hub"), refusing without importing torch
    what cannot load: an unknown built-in, a directory without config.json, a missing path, a
    hub name while the hub cannot be reached and the Hugging Face cache lacks it."""
    base = spec[: -len(RANDOM_SUFFIX)] if spec.endswith(RANDOM_SUFFIX) else spec
    if (BUILTIN_DIR / base / "config.json").exists() and "/" not in spec:
        return "builtin"
    path = Path(spec).expanduser()
    if path.is_dir():
        if not (path / "config.json").exists():
            raise UsageError(
                f"--model {spec}: directory has no config.json; give a Hugging Face model "
                "directory as save_pretrained writes it"
            )
        check_weight_files(path, spec)
        return "path"
    if spec.startswith("toy"):
        raise UsageError(
            f"unknown built-in model {spec!r}; built-in models: {', '.join(builtin_names())}"
        )
    if spec.startswith((".", "/", "~")) or path.exists():
        raise UsageError(f"--model {spec}: no such model directory")
    hub.check_reachable(spec)
    return "hub"


# Bytes per element of the safetensors dtypes a causal LM's weights use.
SAFETENSORS_BYTES = {"F64": 8, "F32": 4, "F16": 2, "BF16": 2, "I64": 8, "I32": 4, "I16": 2,
                     "I8": 1, "U8": 1, "BOOL": 1, "F8_E4M3": 1, "F8_E5M2": 1}  # fmt: skip
EMBEDDINGS = ("wte.weight", "embed_tokens.weight", "embed_in.weight", "word_embeddings.weight")
LAYER_INDEX = re.compile(r"\.(?:h|layers|layer|blocks)\.(\d+)\.")


def check_weight_files(path: Path, spec: str) -> None:
    """Refuse, without torch, a model directory whose safetensors files are cut short or do not
    fit its config.json (embedding shape, number of layers): transformers would fail later with
    a traceback, or quietly start layers it finds no weights for from random values."""
    files = sorted(path.glob("*.safetensors"))
    header: dict[str, Any] = {}
    for file in files:
        header.update(_safetensors_header(file, spec))
    if not header:
        return  # PyTorch .bin weights: transformers checks those as it loads them
    config = read_json(path / "config.json")
    hidden = next((config[k] for k in ("n_embd", "hidden_size", "d_model") if k in config), None)
    vocab = config.get("vocab_size")
    n_layers = config.get("n_layer", config.get("num_hidden_layers"))
    embedding = next((v for k, v in header.items() if k.endswith(EMBEDDINGS)), None)
    if embedding is not None and hidden is not None and vocab is not None:
        if list(embedding["shape"]) != [vocab, hidden]:
            raise UsageError(
                f"--model {spec}: config.json says vocab_size {vocab} and width {hidden}, but the "
                f"weights' token embedding is {embedding['shape']}; the config and the weights "
                "are from different models (save both with save_pretrained)"
            )
    layers = {int(m.group(1)) for k in header if (m := LAYER_INDEX.search(k))}
    if layers and n_layers is not None and max(layers) + 1 != n_layers:
        raise UsageError(
            f"--model {spec}: config.json says {n_layers} layers, the weights hold "
            f"{max(layers) + 1}; the config and the weights are from different models (save "
            "both with save_pretrained)"
        )


def _safetensors_header(file: Path, spec: str) -> dict[str, Any]:
    """The tensors a safetensors file declares (name -> dtype, shape, offsets), each checked to
    lie whole inside the file."""
    size = file.stat().st_size

    def cut(detail: str) -> UsageError:
        return UsageError(
            f"--model {spec}: {file.name} is damaged or cut short ({detail}); copy the model "
            "directory again"
        )

    with open(file, "rb") as fh:
        head = fh.read(8)
        if len(head) < 8:
            raise cut(f"{size} bytes")
        length = int.from_bytes(head, "little")
        if length > size - 8:
            raise cut(f"its header needs {length} bytes, the file has {size}")
        try:
            header = json.loads(fh.read(length))
        except (ValueError, UnicodeDecodeError):
            raise cut("its header is not JSON") from None
    if not isinstance(header, dict):
        raise cut("its header is not a table of tensors")
    header.pop("__metadata__", None)
    data = size - 8 - length
    for name, info in header.items():
        try:
            start, stop = info["data_offsets"]
            count = 1
            for dim in info["shape"]:
                count *= int(dim)
            width = SAFETENSORS_BYTES.get(info["dtype"])
        except (KeyError, TypeError, ValueError):
            raise cut(f"tensor {name} is described wrongly") from None
        if stop > data or start > stop or (width is not None and stop - start != count * width):
            raise cut(f"tensor {name} needs bytes {start}..{stop}, the data holds {data}")
    return header


def read_json(path: Path) -> dict[str, Any]:
    """A JSON file of a model directory, or a one-line error naming it."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise ActstoreError(f"{path}: not a readable JSON file ({exc})") from None
