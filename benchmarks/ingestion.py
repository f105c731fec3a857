"""Ingest at a real model's shape: forward passes alone vs the ingest, bytes per prompt, and the
patching head sweep on the lean layout (the default hooks: derived on read) vs the full one
(`--hooks full`: every hook stored).

    PYTHONPATH=$PWD python benchmarks/ingestion.py              # 64 IOI prompts, batch 8
    PYTHONPATH=$PWD python benchmarks/ingestion.py --n 16       # a small run on a loaded machine
    PYTHONPATH=$PWD python benchmarks/ingestion.py --shape llama-3.2-1b --n 8

`--shape` picks the random-weight model of the patching benchmark's shapes: gpt2-small (the
default), pythia-160m or llama-3.2-1b (16 layers, d_model 2048, 32 query / 8 KV heads).

For each layout it prints: the seconds of the forward passes the ingest needs (both sides, the
same batches, the bridge's plain forward), the ingest's seconds and their ratio, bytes stored
per prompt, the seconds spent computing batches and writing them (on the writer thread,
overlapping the next batch's compute), and the head sweep's (all positions) seconds and its
max |difference| from the full layout's sweep; then the largest difference of an activation
derived from the lean run from the one the full run stored (the full run is always float32, so
with `--dtype float16` this is float16's error). `--profile` prints where the lean ingest's time
goes (cProfile, top functions).
"""

from __future__ import annotations

import argparse
import cProfile
import importlib.util
import io
import os
import pstats
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "tests" / "support"))

import numpy as np  # noqa: E402
import torch  # noqa: E402

from actstore.core.runtime import Runtime  # noqa: E402
from actstore.core.store import Store  # noqa: E402
from actstore.model.adapter import ModelAdapter  # noqa: E402
from ingest.prompts import load_pairs, prepare  # noqa: E402
from ingest.runner import ingest  # noqa: E402
from queries.patching import check_spec, compute_effects  # noqa: E402

LAYOUTS = {"lean": "default", "full": "full"}


def patching_benchmark():
    """The patching benchmark's module: its `SHAPES` and `shaped_model` (random weights)."""
    spec = importlib.util.spec_from_file_location("patching_benchmark", HERE / "patching.py")
    module = importlib.util.module_from_spec(spec)  # type: ignore[arg-type]
    spec.loader.exec_module(module)  # type: ignore[union-attr]
    return module


def forward_seconds(model: ModelAdapter, n: int, batch: int) -> float:
    """The forward passes an ingest of n IOI prompts runs: each batch, both sides."""
    _, pairs, _ = load_pairs(model, "ioi", None, n, 0)
    prep = prepare(model, pairs, "str")
    started = time.perf_counter()
    with torch.no_grad():
        for lo in range(0, n, batch):
            for tokens in (prep.clean, prep.corrupted):
                model.hooked_logits(torch.as_tensor(tokens[lo : lo + batch], dtype=torch.long))
    return time.perf_counter() - started


class Clock:
    """Seconds spent inside some functions (wrapped in place), by name."""

    def __init__(self, *targets: tuple[object, str]) -> None:
        self.seconds = dict.fromkeys((name for _, name in targets), 0.0)
        for owner, name in targets:
            setattr(owner, name, self._timed(name, getattr(owner, name)))

    def _timed(self, name, fn):
        def timed(*args, **kwargs):
            started = time.perf_counter()
            try:
                return fn(*args, **kwargs)
            finally:
                self.seconds[name] += time.perf_counter() - started

        return timed


def run(model: ModelAdapter, path: Path, hooks: str, n: int, batch: int, dtype: str,
        profile: bool) -> float:  # fmt: skip
    prof = cProfile.Profile() if profile else None
    started = time.perf_counter()
    if prof is not None:
        prof.enable()
    ingest(
        Store(path, create=True),
        model=model,
        task="ioi",
        n=n,
        hooks=hooks,
        batch_size=batch,
        dtype=dtype,
        runtime=Runtime(progress=False),
    )
    seconds = time.perf_counter() - started
    if prof is not None:
        prof.disable()
        out = io.StringIO()
        pstats.Stats(prof, stream=out).sort_stats("cumulative").print_stats(40)
        print(out.getvalue())
    return seconds


def head_sweep(model: ModelAdapter, path: Path, batch: int) -> tuple[float, np.ndarray]:
    store = Store(path)
    spec = check_spec(store, 1, "head", "logit-diff", "denoise", 1, None)
    started = time.perf_counter()
    rows, _ = compute_effects(store, 1, spec, model, batch_size=batch,
                              runtime=Runtime(progress=False))  # fmt: skip
    return time.perf_counter() - started, rows["value"].to_numpy()


def derived_error(model: ModelAdapter, lean: Path, full: Path, batch: int) -> float:
    """max |derived from the lean run - stored in the full run| over every hook of the first
    batch, both sides, relative to each hook's largest magnitude."""
    from queries.core.derive import Derivation
    from queries.core.engine import Engine

    lean_s, full_s = Store(lean), Store(full)
    engine = Engine.from_adapter(model)
    finals = torch.as_tensor(lean_s.prompts(1)["seq_len"].to_numpy()[:batch] - 1)
    worst = 0.0
    for side in ("clean", "corrupted"):
        stored = set(lean_s.hooks(1, side))

        def read(hook: str, _side=side, _stored=stored) -> torch.Tensor | None:
            if hook not in _stored:
                return None
            return torch.as_tensor(lean_s.read(1, _side, hook, 0, batch).astype(np.float32))

        d = Derivation(engine, read, finals)
        for hook in full_s.hooks(1, side):
            want = torch.as_tensor(full_s.read(1, side, hook, 0, batch).astype(np.float32))
            with torch.no_grad():
                got = d.get(hook).float()
            worst = max(worst, ((got - want).abs().max() / want.abs().max().clamp(min=1)).item())
    return worst


def main() -> None:
    shapes = patching_benchmark()
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", default="gpt2-small", choices=list(shapes.SHAPES),
                        help="the model's shape (default gpt2-small)")  # fmt: skip
    parser.add_argument("--n", type=int, default=64, help="IOI prompts (default 64)")
    parser.add_argument("--batch", type=int, default=8, help="batch size (default 8)")
    parser.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    parser.add_argument("--no-sweep", action="store_true", help="skip the head sweeps")
    parser.add_argument("--profile", action="store_true", help="profile the lean ingest")
    parser.add_argument("--threads", type=int, default=2, help="torch threads (default 2)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    import ingest.batches
    import ingest.runner

    clock = Clock((ingest.runner, "compute_batch"), (ingest.runner, "write_chunks"))
    model = shapes.shaped_model(args.shape)
    print(f"{args.shape}-shape {model.shape}; {args.n} IOI prompts, batch {args.batch}, "
          f"{args.dtype}; torch {torch.get_num_threads()} threads, {os.cpu_count()} CPUs; "
          f"load average {os.getloadavg()[0]:.1f}")  # fmt: skip
    forward_seconds(model, args.batch, args.batch)  # warm up
    print(f"{'layout':<8}{'forward s':>10}{'ingest s':>10}{'ratio':>7}{'compute s':>10}"
          f"{'write s':>9}{'MB/prompt':>11}{'sweep s':>9}{'max |diff| vs full':>20}")  # fmt: skip
    sweeps: dict[str, np.ndarray] = {}
    with tempfile.TemporaryDirectory() as tmp:
        for layout, hooks in LAYOUTS.items():
            path = Path(tmp) / layout
            fwd = forward_seconds(model, args.n, args.batch)  # just before: the same load
            clock.seconds = dict.fromkeys(clock.seconds, 0.0)
            dtype = args.dtype if layout == "lean" else "float32"
            seconds = run(model, path, hooks, args.n, args.batch, dtype,
                          args.profile and layout == "lean")  # fmt: skip
            info = Store(path).info().row(0, named=True)
            per_prompt = info["stored_bytes"] / info["n_prompts"] / 1e6
            sweep, diff = float("nan"), float("nan")
            if not args.no_sweep:
                sweep, sweeps[layout] = head_sweep(model, path, args.batch)
            if "full" in sweeps and "lean" in sweeps:
                diff = float(np.abs(sweeps["lean"] - sweeps["full"]).max())
            if layout == "full":
                error = derived_error(model, Path(tmp) / "lean", path, args.batch)
                print(
                    f"lean ({args.dtype}) vs full (float32): largest relative |difference| of "
                    f"a derived activation {error:.1e}"
                )
            compute, write = clock.seconds["compute_batch"], clock.seconds["write_chunks"]
            ratio = seconds / fwd
            print(f"{layout:<8}{fwd:>10.2f}{seconds:>10.2f}{ratio:>7.2f}{compute:>10.2f}"
                  f"{write:>9.2f}{per_prompt:>11.2f}{sweep:>9.2f}{diff:>20.1e}",
                  flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
