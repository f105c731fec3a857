"""Subspace activation patching with interpretability-illusion diagnostics (`actstore subspace`).

`query` runs and records a query, `sites` reads and recomputes the patched hook, `directions`
and `das` find directions, `diagnostics` patches along them and flags illusions.
"""

from queries.subspace.subspace import split_indices, stored_basis, stored_report, subspace

__all__ = ["split_indices", "stored_basis", "stored_report", "subspace"]
