"""The task registry: names fixed by SPEC.md map to generators."""

from __future__ import annotations

from actstore.errors import UsageError
from ingest.tasks.base import PromptPair, Task, TaskValidationError, validate_pairs
from ingest.tasks.ioi import IOI

TASKS: dict[str, Task] = {t.name: t for t in (IOI(),)}


def get_task(name: str) -> Task:
    """The task called `name`, or a usage error listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise UsageError(
            f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}"
        ) from None


__all__ = ["TASKS", "PromptPair", "Task", "TaskValidationError", "get_task", "validate_pairs"]
