"""The queries over a store: patching, attribution and circuits, subspace patching, analysis.

`core` holds what every query computes with (the transformer engine, the batch reader, the
metrics, the run's model, the record-once helper), `choices` the option values the command line
offers. Each query family is a subpackage that uses only those two, never another family.
"""
