"""Models converted once into a safetensors file of canonical weights, so that a query loads the
weights it runs on without importing TransformerLens or transformers.

Ingest (and the first query that loads a model through the bridge) writes every weight in the
canonical layout (`actstore.model.architecture.Weights`) to `<cache>/<fingerprint>.safetensors`,
the architecture and the model's name in the file's metadata. The cache is
`$ACTSTORE_MODEL_CACHE`, else `~/.cache/actstore/models`: outside every store, like a model
cache, and shared by the stores of one model. A query whose run records a fingerprint that has
a file there reads it (safetensors maps the file) and imports only torch and safetensors; a
missing or unreadable file means the bridge as before, never a failure.
"""

from __future__ import annotations

import os
from dataclasses import fields
from pathlib import Path
from typing import Any

from actstore.core.files import replace_file
from actstore.model.adapter import ModelShape, resolve_device
from actstore.model.architecture import Architecture, LayerWeights, Norm, Weights

CACHE_ENV = "ACTSTORE_MODEL_CACHE"


def cache_dir() -> Path:
    """Where converted models live."""
    configured = os.environ.get(CACHE_ENV)
    if configured:
        return Path(configured).expanduser()
    return Path.home() / ".cache" / "actstore" / "models"


def converted_path(fingerprint: str) -> Path:
    return cache_dir() / f"{fingerprint}.safetensors"


class ConvertedModel:
    """What queries use of a model (name, architecture, shape, device, fingerprint, weights),
    read from its converted file."""

    def __init__(self, spec: str, architecture: Architecture, weights: Weights, fingerprint: str,
                 device: str):  # fmt: skip
        self.spec = spec
        self.architecture = architecture
        a = architecture
        self.shape = ModelShape(**{f.name: getattr(a, f.name) for f in fields(ModelShape)})
        self.fingerprint = fingerprint
        self.device = device
        self._weights = weights

    def weights(self) -> Weights:
        return self._weights


def save_converted(model: Any) -> Path | None:
    """Write `model`'s canonical weights to the cache once; None where the cache cannot be
    written (queries then keep loading through the bridge)."""
    import torch
    from safetensors.torch import save_file

    path = converted_path(model.fingerprint)
    if path.exists():
        return path
    tensors: dict[str, torch.Tensor] = {}
    with torch.no_grad():
        for name, value in _flatten(model.weights()):
            tensors[name] = value.detach().to("cpu", torch.float32).contiguous().clone()
    metadata = {"architecture": model.architecture.to_json(), "spec": model.spec,
                "fingerprint": model.fingerprint}  # fmt: skip
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        replace_file(path, lambda tmp: save_file(tensors, tmp, metadata))
    except OSError:
        return None
    return path


def load_converted(
    fingerprint: str, device: str | None = None, spec: str | None = None
) -> ConvertedModel | None:
    """The converted model of this fingerprint (and, given `spec`, converted from that model),
    or None if there is none (or it cannot be read). The fingerprint samples the weights, not
    the architecture: two models with equal weights and another attention (a tiny random Llama
    and Mistral of one seed differ only in Mistral's sliding window) share it, so a file
    converted from another model is not used."""
    path = converted_path(fingerprint)
    if not path.is_file():
        return None
    from safetensors import safe_open

    dev = resolve_device(device)
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
            tensors = {name: f.get_tensor(name) for name in f.keys()}
    except (OSError, ValueError, RuntimeError):
        return None
    if meta.get("fingerprint") != fingerprint or "architecture" not in meta:
        return None
    if spec is not None and meta.get("spec") != spec:
        return None
    if dev != "cpu":
        tensors = {name: t.to(dev) for name, t in tensors.items()}
    arch = Architecture.from_json(meta["architecture"])
    return ConvertedModel(meta.get("spec", fingerprint), arch, _unflatten(tensors, arch),
                          fingerprint, dev)  # fmt: skip


def _flatten(weights: Weights) -> list[tuple[str, Any]]:
    """(name, tensor) of every weight present: `W_E`, `ln_final.w`, `layers.3.W_Q`, …"""
    out: list[tuple[str, Any]] = []

    def add(prefix: str, obj: Any) -> None:
        for f in fields(obj):
            value = getattr(obj, f.name)
            if isinstance(value, Norm):
                add(f"{prefix}{f.name}.", value)
            elif value is not None and f.name != "layers":
                out.append((prefix + f.name, value))

    add("", weights)
    for i, layer in enumerate(weights.layers):
        add(f"layers.{i}.", layer)
    return out


def _unflatten(tensors: dict[str, Any], arch: Architecture) -> Weights:
    def build(cls: type, prefix: str) -> Any:
        values: dict[str, Any] = {}
        for f in fields(cls):
            if f.name == "layers":
                continue
            if f"{prefix}{f.name}.w" in tensors:
                values[f.name] = Norm(tensors[f"{prefix}{f.name}.w"],
                                      tensors.get(f"{prefix}{f.name}.b"))  # fmt: skip
            elif prefix + f.name in tensors:
                values[f.name] = tensors[prefix + f.name]
        return values

    layers = [LayerWeights(**build(LayerWeights, f"layers.{i}.")) for i in range(arch.n_layers)]
    return Weights(layers=layers, **build(Weights, ""))
