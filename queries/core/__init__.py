"""The query core: the one transformer engine that every query computes with."""
