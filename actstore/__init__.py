"""actstore: ingest a task's activations once, query them repeatedly.

import actstore
store = actstore.open("/tmp/s")
store.sql("select count(*) from prompts")
"""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from actstore.app.api import ActStore

__version__ = "0.1.0"


def open(path: str, create: bool = False) -> ActStore:  # noqa: A001 - mirrors the builtin
    """Open the store at `path`; with `create=True`, a store that is not there yet is made by
    its first write (its first ingest), so that a refused ingest leaves nothing behind."""
    from actstore.app.api import ActStore

    return ActStore(path, create=create)
