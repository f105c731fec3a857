"""The values each option takes, in one place: the command line offers them as its choices and
the queries and ingest validate against them. Importing this module imports no torch."""

from __future__ import annotations

from collections.abc import Sequence

from actstore.core.errors import UsageError

METRICS = ("logit-diff", "prob", "kl", "prob-diff", "accuracy")
# Attribution follows gradients: a metric without them (accuracy) is refused there.
GRADIENT_METRICS = ("logit-diff", "prob", "kl", "prob-diff")
# Which run is patched into which: denoise patches clean into corrupted, noise the reverse.
DIRECTIONS = ("denoise", "noise")
COMPONENTS = ("head", "head-pos", "resid", "attn-out", "mlp-out")
HEAD_COMPONENTS = ("head", "head-pos")  # the components whose effects rank heads
# How patching recomputes: all three give the same numbers, the first the fastest.
ENGINES = ("downstream", "downstream-no-kv", "full-forward")
# Edge scores: gradient estimates, and `exact`, every edge patched alone (what they estimate).
METHODS = ("atp", "eap", "eap-ig", "eap-ig-activations", "exact")
LEVELS = ("node", "edge")
SOURCES = ("mean-diff", "das")  # subspace bases learned from the run (else a file)
SETS = ("head", "edge")  # what an overlap compares
PLOTS = ("effects", "overlap", "faithfulness")
OPS = ("mean", "class-mean", "head-norm")
SIDES = ("clean", "corrupted")
# How ingest makes a run's corrupted side: the task's other prompt, or Gaussian noise on the
# subject's token embeddings; and the dtype its activations are stored in.
CORRUPTIONS = ("str", "gaussian")
DTYPES = ("float32", "float16")
# What one user SQL statement may cost by default (actstore.core.sandbox; --timeout, --max-rows,
# --max-mb). The timeout stays under the writer's wait for readers (catalog.WRITE_WAIT_S, 120 s),
# so that a statement left running never makes a concurrent ingest fail.
SQL_TIMEOUT_S = 60.0
SQL_MAX_ROWS = 5_000_000
SQL_MAX_MB = 2048


def check(option: str, value: str, choices: Sequence[str]) -> None:
    """Refuse a value outside `choices`, naming the option and what it takes."""
    if value not in choices:
        raise UsageError(f"{option} {value}: choose one of {', '.join(choices)}")


def check_batch_size(batch_size: int) -> None:
    """Refuse a query's --batch-size below 1 (prompts per forward)."""
    if batch_size < 1:
        raise UsageError(f"--batch-size {batch_size}: need at least 1")
