"""Shared by the attribution benchmarks: the common options and a temporary IOI store."""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from actstore.core.runtime import Runtime
from actstore.core.store import Store
from ingest.runner import ingest


def parser(doc: str, model: str, n: int) -> argparse.ArgumentParser:
    """--model, --n and --device, with this benchmark's defaults."""
    p = argparse.ArgumentParser(description=doc.splitlines()[0])
    p.add_argument("--model", default=model)
    p.add_argument("--n", type=int, default=n)
    p.add_argument("--device")
    return p


@contextmanager
def temporary_ioi_store(args: argparse.Namespace, batch_size: int) -> Iterator[Store]:
    """A store holding run 1: IOI on args.model with args.n prompts; removed afterwards."""
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(Path(tmp) / "store", create=True)
        ingest(
            store,
            model=args.model,
            task="ioi",
            n=args.n,
            batch_size=batch_size,
            runtime=Runtime(device=args.device, progress=False),
        )
        yield store
