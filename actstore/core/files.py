"""Files replaced whole: every file actstore writes outside Zarr and DuckDB (outputs, the arrays'
metadata, shard manifests, the location record, converted weights) goes through `replace_file`,
so that no reader ever sees half of one."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable
from pathlib import Path


def replace_file(
    path: Path,
    write: Callable[[Path], None],
    sync: Callable[[Path], None] | None = None,
    exclusive: bool = False,
) -> bool:
    """Let `write` fill a partial file beside `path`, then put it in place: a reader sees the
    old file or the new, and a failure leaves no partial file (a killed writer's is named
    `*.partial`, which nothing reads). The partial file is this thread's own, so concurrent
    writers never share one. `sync` (an fsync) makes the partial file durable before the rename
    and the rename after it. `exclusive`: only where no file is yet; False if one was there."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}.partial")
    try:
        write(tmp)
        if sync is not None:
            sync(tmp)
        if exclusive:
            try:
                os.link(tmp, path)
            except FileExistsError:
                return False
        else:
            os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    if sync is not None:
        sync(path)
    return True
