"""Path patching (`actstore path`): a sender's changed output reaches chosen receivers only by
the direct path, everything downstream of them computed freely (Wang et al.).

`spec` parses and checks senders and receivers without torch, `compute` runs the variants on the
engine, `path` records the query.
"""

from queries.paths.path import check_path, compute_paths, path, stored_paths

__all__ = ["check_path", "compute_paths", "path", "stored_paths"]
