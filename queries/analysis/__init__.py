"""Analysis over recorded queries, torch-free: overlap of head and edge sets, lookups (top heads,
provenance), plots, out-of-core reductions and the HTML report."""
