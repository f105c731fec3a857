"""The task registry: each task's CLI name maps to its generator."""

from __future__ import annotations

from actstore.core.errors import UsageError
from ingest.tasks.base import PromptPair, Task, TaskValidationError, validate_pairs
from ingest.tasks.capital_country import CapitalCountry
from ingest.tasks.colored_objects import ColoredObjects
from ingest.tasks.greater_than import GreaterThan
from ingest.tasks.ioi import IOI
from ingest.tasks.sva import SVA

TASKS: dict[str, Task] = {
    t.name: t for t in (IOI(), ColoredObjects(), GreaterThan(), SVA(), CapitalCountry())
}


def toy_vocabulary() -> list[str]:
    """Every word of every task's toy phrasing, in first-seen order: the toy models' vocabulary."""
    seen: dict[str, None] = {}
    for task in TASKS.values():
        for word in task.vocabulary():
            seen.setdefault(word, None)
    return list(seen)


def get_task(name: str) -> Task:
    """The task called `name`, or a usage error listing the known ones."""
    try:
        return TASKS[name]
    except KeyError:
        raise UsageError(
            f"unknown task {name!r}; known tasks: {', '.join(sorted(TASKS))}"
        ) from None


__all__ = [
    "TASKS",
    "PromptPair",
    "Task",
    "TaskValidationError",
    "get_task",
    "toy_vocabulary",
    "validate_pairs",
]
