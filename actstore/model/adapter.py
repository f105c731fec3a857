"""The model adapter: one interface over TransformerLens' TransformerBridge for every model source.

A model comes from one of three places:
- a built-in toy model shipped in `actstore/model/builtin/<name>/` (`toy`, `toy-...`), or
  `toy-random`, the toy architecture with seeded random weights;
- a Hugging Face model directory (`config.json`, weights, tokenizer files), given as a path;
- a Hugging Face hub name that TransformerLens supports (`gpt2`, `pythia-160m`, ...).

The adapter is the only code that touches the bridge, and with actstore.model.weights (which reads
the parameters, family by family) the Hugging Face model: queries compute with the engine
(queries/core) from `architecture` and `weights()`; ingest and the tests' exact references use the
bridge's hooked forward through `run_with_cache` and `hooked_logits`.
Families outside actstore.model.architecture.FAMILIES are refused before their weights are read.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actstore.core.errors import ActstoreError, UsageError, first_line
from actstore.model.architecture import Weights, check_family, from_hf_config
from actstore.model.model_spec import (
    BUILTIN_DIR,
    RANDOM_SUFFIX,
    builtin_names,
    check_model_spec,
    read_json,
)
from actstore.model.weights import extract_weights

if TYPE_CHECKING:
    import torch

Hook = tuple[str, Callable[..., Any]]


@dataclass(frozen=True)
class ModelShape:
    """The dimensions every query needs, independent of the model's source."""

    n_layers: int
    n_heads: int
    d_model: int
    d_head: int
    d_mlp: int
    d_vocab: int
    n_ctx: int

    def to_dict(self) -> dict[str, int]:
        return asdict(self)


DEVICE_NAME = re.compile(r"(auto|cpu|cuda(:\d+)?|mps)")


def check_device_name(device: str | None) -> None:
    """Refuse a device name torch would not know, without importing torch."""
    if device not in (None, "") and not DEVICE_NAME.fullmatch(device):
        raise UsageError(f"--device {device}: not a device; choose cpu, cuda, cuda:N or mps")


def resolve_device(device: str | None) -> str:
    """CUDA only when asked for and present; CPU otherwise."""
    check_device_name(device)
    import torch

    if device in (None, "", "auto"):
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        if not torch.cuda.is_available():
            raise UsageError(f"--device {device}: CUDA is not available here; use --device cpu")
        index = int(device.partition(":")[2] or 0)
        if index >= torch.cuda.device_count():
            raise UsageError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s)"
            )
    if device == "mps" and not torch.backends.mps.is_available():
        raise UsageError("--device mps: MPS is not available here; use --device cpu")
    return device


class ModelAdapter:
    """A loaded model: tokenizer, shape, architecture, weights and the bridge's hooked forward."""

    def __init__(self, spec: str, bridge: Any, tokenizer: Any, device: str, source: str):
        self.spec = spec
        self.bridge = bridge
        self.tokenizer = tokenizer
        self.device = device
        self.source = source
        self.architecture = from_hf_config(bridge.original_model.config.to_dict(), spec)
        a = self.architecture
        self.shape = ModelShape(**{f.name: getattr(a, f.name) for f in fields(ModelShape)})
        self._fingerprint: str | None = None

    @property
    def bos_id(self) -> int:
        bos = self.tokenizer.bos_token_id
        return int(bos if bos is not None else self.tokenizer.eos_token_id)

    @property
    def pad_id(self) -> int:
        pad = self.tokenizer.pad_token_id
        return int(pad if pad is not None else self.bos_id)

    @property
    def fingerprint(self) -> str:
        """A hash of the shape and a sample of every weight: tells two models apart cheaply."""
        if self._fingerprint is None:
            import torch

            h = hashlib.sha256(json.dumps(self.shape.to_dict(), sort_keys=True).encode())
            with torch.no_grad():
                for name, p in sorted(self.bridge.named_parameters()):
                    flat = p.detach().reshape(-1)
                    sample = torch.cat([flat[:64], flat[-64:]]).to("cpu", torch.float32)
                    h.update(name.encode())
                    h.update(sample.numpy().tobytes())
            self._fingerprint = h.hexdigest()[:16]
        return self._fingerprint

    def token_ids(self, text: str) -> list[int]:
        """Token ids of `text` without BOS (how an answer continues a prompt)."""
        return list(self.tokenizer(text, add_special_tokens=False)["input_ids"])

    def tokenize(self, text: str) -> list[int]:
        """Token ids of a prompt, BOS first, as the model sees it."""
        return [self.bos_id] + self.token_ids(text)

    def token_offsets(self, text: str) -> list[tuple[int, int]]:
        """Character span of each token of `text` (BOS excluded), for locating words."""
        enc = self.tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        return [tuple(o) for o in enc["offset_mapping"]]

    def weights(self) -> Weights:
        """Every weight in the canonical layout (float32, detached, on the model's device; views
        of the parameters where the layout allows)."""
        import torch

        with torch.no_grad():
            return extract_weights(self.bridge.original_model, self.architecture)

    def hook_names(self) -> set[str]:
        """Every TransformerLens hook name the model has."""
        return set(self.bridge.hook_dict)

    def run_with_cache(
        self, tokens: torch.Tensor, names: set[str] | None = None, hooks: Sequence[Hook] = ()
    ) -> tuple[torch.Tensor, Mapping[str, torch.Tensor]]:
        """Logits and the activations named `names` (default: every hook) of a hooked forward
        (what ingest stores)."""
        with self.bridge.hooks(fwd_hooks=list(hooks)):
            logits, cache = self.bridge.run_with_cache(
                tokens, names_filter=None if names is None else lambda name: name in names
            )
        return logits, cache if names is None else {name: cache[name] for name in names}

    def hooked_logits(
        self, tokens: torch.Tensor, hooks: Sequence[Hook] = (), split_inputs: bool = False
    ) -> torch.Tensor:
        """Logits (batch, pos, vocab) of the bridge's own forward with TransformerLens hooks
        (hook name, fn) applied: the slow exact path that the engine is checked against.
        `split_inputs` adds TransformerLens' per-head hook_q/k/v_input and hook_mlp_in."""
        if not split_inputs:
            with self.bridge.hooks(fwd_hooks=list(hooks)):
                return self.bridge(tokens)
        self.bridge.set_use_split_qkv_input(True)
        self.bridge.set_use_hook_mlp_in(True)
        try:
            return self.hooked_logits(tokens, hooks)
        finally:
            self.bridge.set_use_split_qkv_input(False)
            self.bridge.set_use_hook_mlp_in(False)


def toy_config(settings: Mapping[str, Any]) -> Any:
    """The Hugging Face config of a toy model's config.json settings: the class its
    `model_type` names (GPT-2 when absent), every other setting at the library's default."""
    from transformers import AutoConfig

    rest = dict(settings)
    return AutoConfig.for_model(rest.pop("model_type", "gpt2"), **rest)


def toy_model(settings: Mapping[str, Any]) -> Any:
    """An untrained toy model of those settings, with torch's current seed: what training
    starts from and what a built-in's weights load into."""
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_config(toy_config(settings), attn_implementation="eager")


def _builtin_from_dir(directory: Path, random_seed: int | None) -> tuple[Any, Any]:
    """A built-in toy model: the Hugging Face class its config.json's `model_type` names (GPT-2
    when absent), its weights and its word vocabulary."""
    import torch

    from actstore.model.tokenizer import read_vocab, word_level_tokenizer

    settings = json.loads((directory / "config.json").read_text())
    words = read_vocab(directory / "vocab.json")
    tokenizer = word_level_tokenizer(words, name=directory.name)
    if random_seed is not None:
        torch.manual_seed(random_seed)
        hf = toy_model(settings)
    else:
        weights = directory / "model.safetensors"
        if not weights.exists():
            raise ActstoreError(
                f"built-in model {directory.name!r} has no trained weights at {weights}; "
                f"train it (python -m tools.train_toy) or use {directory.name}{RANDOM_SUFFIX}"
            )
        from safetensors.torch import load_file

        hf = toy_model(settings)
        state = load_file(str(weights))
        missing, unexpected = hf.load_state_dict(state, strict=False)
        tied = {"lm_head.weight"} if hf.config.tie_word_embeddings else set()
        buffers = ("attn.bias", "attn.masked_bias", "rotary_emb.inv_freq")
        real_missing = [k for k in missing if not k.endswith(buffers) and k not in tied]
        if real_missing or unexpected:
            raise ActstoreError(
                f"built-in model {directory.name!r}: weights do not fit the config "
                f"(missing {real_missing[:3]}, unexpected {unexpected[:3]}); retrain it"
            )
    hf.eval()
    return hf, tokenizer


def _silence_transformers() -> None:
    """Quiet library logs; their progress bars ("Loading weights") only on a terminal."""
    import logging
    import sys

    for name in ("transformers", "transformer_lens", "huggingface_hub"):
        logging.getLogger(name).setLevel(logging.ERROR)
    if not sys.stderr.isatty():
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()


def load_model(spec: str, device: str | None = None, source: str | None = None) -> ModelAdapter:
    """Load a model by built-in name, local Hugging Face directory, or hub name; `source` is
    what check_model_spec said of `spec` when the caller checked it already."""
    source = source or check_model_spec(spec)
    dev = resolve_device(device)
    _silence_transformers()
    from transformer_lens.model_bridge import TransformerBridge

    if source == "builtin":
        base = spec[: -len(RANDOM_SUFFIX)] if spec.endswith(RANDOM_SUFFIX) else spec
        seed = 0 if spec.endswith(RANDOM_SUFFIX) else None
        hf, tokenizer = _builtin_from_dir(BUILTIN_DIR / base, seed)
        return adapter_from_hf(spec, hf, tokenizer, dev, source="builtin")
    elif source == "path":
        path = Path(spec).expanduser().resolve()
        check_family(read_json(path / "config.json").get("model_type"), spec)
        from transformers import AutoModelForCausalLM

        try:
            tokenizer = _directory_tokenizer(path)
            hf = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager")
        except (OSError, ValueError) as exc:
            raise ActstoreError(
                f"--model {spec}: cannot load the directory: {first_line(exc)}"
            ) from None
        return adapter_from_hf(str(path), hf, tokenizer, dev, source="path")
    else:
        try:
            bridge = TransformerBridge.boot_transformers(spec, device=dev)
        except Exception as exc:  # the hub and TL raise many kinds; all mean "cannot load"
            msg = first_line(exc)
            raise ActstoreError(
                f"unknown model {spec!r} (not built-in, not a directory, not loadable from the "
                f"hub: {msg[:160]}); built-in models: {', '.join(builtin_names())}"
            ) from None
        return _adapter(spec, bridge, bridge.tokenizer, dev, "hub")


def adapter_from_hf(
    spec: str, hf: Any, tokenizer: Any, device: str | None = None, source: str = "memory"
) -> ModelAdapter:
    """Wrap an in-memory Hugging Face causal LM and its tokenizer (how every non-hub model is
    loaded; also for models built in code, e.g. a randomly initialised GPT-2 shape)."""
    _silence_transformers()
    from transformer_lens.model_bridge import TransformerBridge

    dev = resolve_device(device)
    bridge = TransformerBridge.boot_transformers(spec, hf_model=hf, tokenizer=tokenizer, device=dev)
    return _adapter(spec, bridge, tokenizer, dev, source)


def _adapter(spec: str, bridge: Any, tokenizer: Any, device: str, source: str) -> ModelAdapter:
    bridge.eval()
    return ModelAdapter(spec, bridge, tokenizer, device, source)


def _directory_tokenizer(path: Path) -> Any:
    """The directory's tokenizer. A generic fast tokenizer (what a tokenizer built in code saves
    as) loads as itself: AutoTokenizer would swap in the family's own class for some families
    (Qwen2), which re-tokenizes the saved vocabulary differently."""
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    config = path / "tokenizer_config.json"
    declared = read_json(config).get("tokenizer_class") if config.exists() else None
    if declared in ("TokenizersBackend", "PreTrainedTokenizerFast"):
        return PreTrainedTokenizerFast.from_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


def model_record(model: ModelAdapter) -> dict[str, Any]:
    """The `models` row of a model, by column name."""
    s = model.shape
    return {
        "model": model.spec, "fingerprint": model.fingerprint, "source": model.source,
        "n_layers": s.n_layers, "n_heads": s.n_heads, "d_model": s.d_model, "d_head": s.d_head,
        "d_mlp": s.d_mlp, "d_vocab": s.d_vocab, "n_ctx": s.n_ctx,
        "architecture": model.architecture.to_json(),
    }  # fmt: skip
