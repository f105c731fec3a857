"""The composition roots: the Python API, the command line and the demo. Only these import
ingest and queries together; `actstore.open` reaches them lazily."""
