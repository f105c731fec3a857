"""The model adapter: one interface over TransformerLens' TransformerBridge for every model source.

A model comes from one of three places:
- a built-in toy model shipped in `actstore/builtin/<name>/` (`toy`, `toy-...`), or `toy-random`,
  the toy architecture with seeded random weights;
- a Hugging Face model directory (`config.json`, weights, tokenizer files), given as a path;
- a Hugging Face hub name that TransformerLens supports (`gpt2`, `pythia-160m`, ...).

Downstream-only recompute loops the blocks itself: in TransformerLens 4, `start_at_layer`
still runs the upstream blocks (STACK-NOTES).
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from actstore import hub
from actstore.errors import ActstoreError, UsageError

if TYPE_CHECKING:
    import torch

BUILTIN_DIR = Path(__file__).parent / "builtin"
RANDOM_SUFFIX = "-random"

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


def builtin_names() -> list[str]:
    """Names of the built-in models: every shipped directory, plus its `-random` twin."""
    names = sorted(p.name for p in BUILTIN_DIR.iterdir() if (p / "config.json").exists())
    return names + [n + RANDOM_SUFFIX for n in names]


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
        return "path"
    if spec.startswith("toy"):
        raise UsageError(
            f"unknown built-in model {spec!r}; built-in models: {', '.join(builtin_names())}"
        )
    if spec.startswith((".", "/", "~")) or path.exists():
        raise UsageError(f"--model {spec}: no such model directory")
    hub.check_reachable(spec)
    return "hub"


class ModelAdapter:
    """A loaded model: tokenizer, shape, and the embed / run_blocks / unembed pieces."""

    def __init__(self, spec: str, bridge: Any, tokenizer: Any, device: str, source: str):
        self.spec = spec
        self.bridge = bridge
        self.tokenizer = tokenizer
        self.device = device
        self.source = source
        cfg = bridge.cfg
        self.shape = ModelShape(
            n_layers=int(cfg.n_layers),
            n_heads=int(cfg.n_heads),
            d_model=int(cfg.d_model),
            d_head=int(cfg.d_head),
            d_mlp=int(cfg.d_mlp),
            d_vocab=int(cfg.d_vocab),
            n_ctx=int(cfg.n_ctx),
        )
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

    def embed(self, tokens: torch.Tensor) -> torch.Tensor:
        """Token plus position embeddings: the residual stream entering block 0."""
        import torch

        b = self.bridge
        positions = torch.arange(tokens.shape[-1], device=tokens.device).expand(tokens.shape)
        return b.embed(tokens) + b.pos_embed(positions)

    def run_blocks(
        self, resid: torch.Tensor, start: int, stop: int | None = None, hooks: Sequence[Hook] = ()
    ) -> torch.Tensor:
        """Run blocks [start, stop) on `resid`; hooks are (hook name, fn) pairs as in TL."""
        stop = self.shape.n_layers if stop is None else stop
        x = resid
        with self.bridge.hooks(fwd_hooks=list(hooks)) if hooks else _nullcontext():
            for block in self.bridge.blocks[start:stop]:
                out = block(x)
                x = out[0] if isinstance(out, tuple) else out
        return x

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Final layer norm and unembedding: residual stream to logits."""
        return self.bridge.unembed(self.bridge.ln_final(resid))

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        """Logits of a full forward pass, built from the three pieces above."""
        return self.unembed(self.run_blocks(self.embed(tokens), 0))


class _nullcontext:
    def __enter__(self) -> None:
        return None

    def __exit__(self, *exc: object) -> None:
        return None


def _gpt2_from_dir(directory: Path, random_seed: int | None) -> tuple[Any, Any]:
    """A built-in toy model: HF GPT-2 architecture from config.json, weights, word vocabulary."""
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    from actstore.tokenizer import read_vocab, word_level_tokenizer

    config = GPT2Config(**json.loads((directory / "config.json").read_text()))
    words = read_vocab(directory / "vocab.json")
    tokenizer = word_level_tokenizer(words, name=directory.name)
    if random_seed is not None:
        torch.manual_seed(random_seed)
        hf = GPT2LMHeadModel(config)
    else:
        weights = directory / "model.safetensors"
        if not weights.exists():
            raise ActstoreError(
                f"built-in model {directory.name!r} has no trained weights at {weights}; "
                f"train it (python -m ingest.train_toy) or use {directory.name}{RANDOM_SUFFIX}"
            )
        from safetensors.torch import load_file

        hf = GPT2LMHeadModel(config)
        state = load_file(str(weights))
        missing, unexpected = hf.load_state_dict(state, strict=False)
        real_missing = [k for k in missing if not k.endswith(("attn.bias", "attn.masked_bias"))]
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


def load_model(spec: str, device: str | None = None) -> ModelAdapter:
    """Load a model by built-in name, local Hugging Face directory, or hub name."""
    source = check_model_spec(spec)
    dev = resolve_device(device)
    _silence_transformers()
    from transformer_lens.model_bridge import TransformerBridge

    if source == "builtin":
        base = spec[: -len(RANDOM_SUFFIX)] if spec.endswith(RANDOM_SUFFIX) else spec
        seed = 0 if spec.endswith(RANDOM_SUFFIX) else None
        hf, tokenizer = _gpt2_from_dir(BUILTIN_DIR / base, seed)
        return adapter_from_hf(spec, hf, tokenizer, dev, source="builtin")
    elif source == "path":
        path = Path(spec).expanduser().resolve()
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(str(path))
            hf = AutoModelForCausalLM.from_pretrained(str(path), attn_implementation="eager")
        except (OSError, ValueError) as exc:
            first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            raise ActstoreError(f"--model {spec}: cannot load the directory: {first}") from None
        return adapter_from_hf(str(path), hf, tokenizer, dev, source="path")
    else:
        try:
            bridge = TransformerBridge.boot_transformers(spec, device=dev)
        except Exception as exc:  # the hub and TL raise many kinds; all mean "cannot load"
            msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
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
    if getattr(bridge.cfg, "positional_embedding_type", "standard") != "standard":
        raise ActstoreError(
            f"model {spec!r} uses {bridge.cfg.positional_embedding_type} positions; actstore's "
            "downstream recompute supports GPT-2-style learned positional embeddings for now"
        )
    bridge.eval()
    return ModelAdapter(spec, bridge, tokenizer, device, source)
