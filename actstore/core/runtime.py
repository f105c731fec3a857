"""How a query runs, apart from what it asks: one `Runtime` that every query verb takes.

Device, progress bar, worker count and scheduler change where and how fast a query computes,
never its numbers or its record (the catalog's parameters leave them out, so a query asked on
two workers is found again by one asked on none). Each has its default here, once; the command
line builds one Runtime from its shared options, the Python API takes one as `runtime=`.

`workers` and `scheduler` mean the same on every verb, and as on `ingest`: with neither, the
query runs in this process; `workers=N` alone starts a local Dask cluster of N single-threaded
processes; a `scheduler` (a running Dask scheduler's address, whose workers see the store at the
same location) runs the tasks on its workers, once it has at least N of them with `workers=N`.
"""

from __future__ import annotations

from dataclasses import dataclass

from actstore.core.cluster import check_address
from actstore.core.errors import UsageError


@dataclass(frozen=True)
class Runtime:
    """Where and how a query computes: `device` (cpu, cuda, …; None: CUDA when available),
    `progress` (a bar on stderr; None: when stderr is a terminal), `workers` (a local Dask
    cluster of N processes, or the scheduler's once it has N) and `scheduler` (a Dask
    scheduler's address). Checked when made: a bad value is refused before any work."""

    device: str | None = None
    progress: bool | None = None
    workers: int | None = None
    scheduler: str | None = None

    def __post_init__(self) -> None:
        if self.workers is not None and (isinstance(self.workers, bool) or self.workers < 1):
            raise UsageError(f"--workers {self.workers}: need at least 1 worker")
        if self.scheduler is not None:
            check_address(self.scheduler)

    @property
    def distributed(self) -> bool:
        """Whether the query's tasks run on Dask workers rather than in this process."""
        return self.workers is not None or self.scheduler is not None

    def in_process(self, verb: str) -> Runtime:
        """This runtime, for a verb that computes in this process only: workers or a scheduler
        are refused, not ignored."""
        if self.distributed:
            raise UsageError(
                f"{verb} runs in this process; --workers/--scheduler apply to patch, attribute, "
                "circuit, path, intervene and reduce"
            )
        return self
