"""Out-of-core reductions over a run's prompts (`actstore reduce`): the one query family that
reads activations without a patch, so it may load the model for a derived hook."""

from queries.reduction.reduce import reduce

__all__ = ["reduce"]
