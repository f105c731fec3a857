"""Exact activation patching from the store (`actstore patch`): `patch` runs and records a query,
`compute_effects` computes effects without recording (benchmarks, tests)."""

from queries.patching.patch import PatchSpec, check_spec, compute_effects, patch

__all__ = ["PatchSpec", "check_spec", "compute_effects", "patch"]
