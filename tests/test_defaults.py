"""actstore/app/defaults.py: the command line reads each option's default from the function's
source, never importing it (that would import torch), and refuses what it cannot read."""

from __future__ import annotations

import inspect
import sys
import textwrap

import pytest

from actstore.app.defaults import SourceDefaultError, defaults

# A package whose __init__ refuses to be imported: reading defaults through it must not run it.
PACKAGE = {
    "__init__.py": """
        from srcdefaults_pkg.verbs import verb
        raise ImportError("reading a default imported the package")
    """,
    "limits.py": """
        TIMEOUT_S, MAX_ROWS = 60.0, 5_000
        SIDE: str = "clean"
    """,
    "verbs.py": """
        from srcdefaults_pkg import limits
        from srcdefaults_pkg.limits import SIDE as DEFAULT_SIDE

        WINDOW = 1
        WINDOW = 2  # the last assignment is the value the function sees

        def verb(store, run, metric="logit-diff", window=WINDOW, side=DEFAULT_SIDE,
                 timeout=limits.TIMEOUT_S, *, rows=limits.MAX_ROWS, tasks=("ioi", "sva"),
                 runtime=Runtime(), steps=None):
            "A verb."

        class Store:
            def export(self, fmt="csv", out="-"):
                "A method."
    """,
}


@pytest.fixture(scope="module")
def package(tmp_path_factory):
    """The package on sys.path, once per module (what is read is cached per process)."""
    tmp_path = tmp_path_factory.mktemp("source")
    root = tmp_path / "srcdefaults_pkg"
    root.mkdir()
    for name, text in PACKAGE.items():
        (root / name).write_text(textwrap.dedent(text))
    with pytest.MonkeyPatch.context() as mp:
        mp.syspath_prepend(str(tmp_path))
        yield "srcdefaults_pkg"
    assert "srcdefaults_pkg" not in sys.modules


def test_literals_and_constants_are_read_through_a_re_export(package):
    found = defaults(package, "verb")
    assert found["metric"] == "logit-diff"
    assert found["window"] == 2
    assert found["side"] == "clean"  # imported under another name
    assert found["timeout"] == 60.0  # module.CONSTANT, assigned by tuple
    assert found["rows"] == 5_000  # keyword-only
    assert found["tasks"] == ("ioi", "sva")
    assert found["steps"] is None
    assert set(found) == {"metric", "window", "side", "timeout", "rows", "tasks", "runtime",
                          "steps"}  # fmt: skip
    assert "run" not in found
    assert dict(defaults(f"{package}.verbs", "Store.export")) == {"fmt": "csv", "out": "-"}


def test_what_cannot_be_read_is_refused_naming_it(package):
    refused = r"verbs\.verb\(runtime=…\): Runtime\(\) is neither a literal"
    with pytest.raises(SourceDefaultError, match=refused):
        defaults(package, "verb")["runtime"]
    with pytest.raises(SourceDefaultError, match="no argument 'run' with a default"):
        defaults(package, "verb")["run"]
    with pytest.raises(SourceDefaultError, match=r"srcdefaults_pkg\.nope: not a function"):
        defaults(package, "nope")
    with pytest.raises(SourceDefaultError, match=r"Store\.import_: not a function"):
        defaults(f"{package}.verbs", "Store.import_")
    with pytest.raises(SourceDefaultError, match="no source file for module srcdefaults_pkg.gone"):
        defaults(f"{package}.gone", "verb")


def test_the_commands_functions_read_as_imported():
    """What the command line reads equals the defaults Python itself gives the functions (a
    module constant among them: attention's `source=END`)."""
    from queries.attention import attention
    from queries.patching import patch

    for module, fn in (("queries.attention", attention), ("queries.patching", patch)):
        read = defaults(module, fn.__name__)
        python = {p.name: p.default for p in inspect.signature(fn).parameters.values()
                  if p.default is not p.empty and p.name != "runtime"}  # fmt: skip
        assert {name: read[name] for name in python} == python
    assert defaults("queries.attention", "attention")["source"] == "END"
