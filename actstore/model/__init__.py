"""The model layer (torch, transformers, TransformerLens): the model adapter and spec, the
architecture description, hook names and what derives on read, tokenizers, the metrics, and the
built-in toys (builtin/)."""
