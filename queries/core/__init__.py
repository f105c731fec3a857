"""The query core: the one transformer engine, the one reader of a run's stored arrays, the
metrics, the run's model and the find → compute → record → read-back of a recorded query."""
