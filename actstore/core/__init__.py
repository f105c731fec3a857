"""The store, torch-free: the Zarr arrays and the DuckDB catalog, the one writer and its lock,
the views, the recorded results, verification, and the option vocabularies every layer shares."""
