"""Stores for patching tests: IOI prompts of one template, so every prompt has the same length."""

from __future__ import annotations

from pathlib import Path

from ingest.tasks import TASKS
from ingest.tasks.base import PromptPair
from ingest.tasks.ioi import IOI


class OneTemplateIOI:
    """IOI pairs of a single template (equal token lengths), for per-position parity tests."""

    name = "ioi-one-template"
    description = "IOI, template 0 only"

    def __init__(self, template: int = 0):
        self.template = template

    def generate(self, n: int, seed: int, model) -> list[PromptPair]:
        pairs = [p for p in IOI().generate(8 * n, seed, model)
                 if p.meta["template"] == self.template]  # fmt: skip
        return pairs[:n]


def ingest_pairs_task(path: Path, model: str, task, n: int, batch_size: int, **kwargs) -> Path:
    """Ingest `task` (any object with the task interface) under its name, then unregister it."""
    from ingest.runner import ingest

    TASKS[task.name] = task
    try:
        ingest(path, model=model, task=task.name, n=n, batch_size=batch_size, progress=False,
               **kwargs)  # fmt: skip
    finally:
        del TASKS[task.name]
    return path
