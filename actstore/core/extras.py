"""The optional engines behind some options, checked before any work: dask.distributed behind
`--workers`/`--scheduler`, s3fs behind `--arrays-url`, Playwright behind the report's browser
test.

Installed from ranges alone, pip can pair releases that cannot work together (a new dask with
distributed 2021.4.1, which fails on import): the command would then die mid-run with a traceback
and leave a `failed` run. Each check reads the installed versions and each distribution's own
requirements from the package metadata, then imports the engine, and refuses in one line that
names the versions and the fix, before the store is touched.
"""

from __future__ import annotations

import importlib
from functools import cache
from importlib import metadata

from actstore.core.errors import ActstoreError, first_line

FIX = "install the tested set: pip install -c requirements.lock -e '.[{extra}]'"

# extra -> (distributions whose mutual requirements must hold, modules to import)
ENGINES: dict[str, tuple[tuple[str, ...], tuple[str, ...]]] = {
    "distributed": (("dask", "distributed"), ("dask", "distributed")),
    "s3": (("s3fs", "aiobotocore", "botocore", "fsspec"), ("s3fs",)),
    "dev": (("playwright", "greenlet", "pyee"), ("playwright.sync_api",)),
}
PURPOSE = {
    "distributed": "--workers/--scheduler need dask.distributed",
    "s3": "object storage (--arrays-url s3://…) needs s3fs",
    "dev": "the browser test needs Playwright",
}


def _version(name: str) -> str | None:
    try:
        return metadata.version(name)
    except metadata.PackageNotFoundError:
        return None


def conflicts(names: tuple[str, ...]) -> list[str]:
    """Each unmet requirement among `names`, as `a X requires b<spec>, b Y is installed`: the
    part of `pip check` that concerns these distributions."""
    from packaging.requirements import Requirement

    installed = {name: _version(name) for name in names}
    found = []
    for name, version in installed.items():
        if version is None:
            continue
        for text in metadata.requires(name) or ():
            req = Requirement(text)
            other = req.name.lower().replace("_", "-")
            if other not in installed or installed[other] is None:
                continue
            if req.marker is not None and not req.marker.evaluate({"extra": ""}):
                continue
            if not req.specifier.contains(installed[other], prereleases=True):
                found.append(
                    f"{name} {version} requires {other}{req.specifier}, "
                    f"{other} {installed[other]} is installed"
                )
    return found


@cache
def check_engine(extra: str) -> None:
    """Raise a one-line ActstoreError unless the engine of `extra` is installed, consistent and
    importable."""
    names, modules = ENGINES[extra]
    fix = FIX.format(extra=extra)
    missing = [name for name in names if _version(name) is None and name in _roots(modules)]
    if missing:
        raise ActstoreError(f"{PURPOSE[extra]}, and {', '.join(missing)} is not installed; {fix}")
    broken = conflicts(names)
    if broken:
        raise ActstoreError(f"{PURPOSE[extra]}, but {'; '.join(broken)}; {fix}")
    for module in modules:
        try:
            importlib.import_module(module)
        except Exception as exc:  # an engine that fails to import is refused, whatever the cause
            versions = ", ".join(f"{name} {_version(name)}" for name in names if _version(name))
            raise ActstoreError(
                f"{PURPOSE[extra]}, but importing {module} failed ({versions}): "
                f"{first_line(exc)}; {fix}"
            ) from None


def _roots(modules: tuple[str, ...]) -> set[str]:
    return {module.split(".")[0] for module in modules}
