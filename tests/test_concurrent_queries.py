"""The same uncached query started twice at once is recorded once: the second to finish reuses
the first's query (and both print its rows)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

import actstore

ROOT = Path(__file__).resolve().parent.parent
# Each process imports the query stack first, then waits for the word to start, so that both
# look for the query before either has recorded it.
ASK = """
import sys
from click.testing import CliRunner
from actstore.app.cli import main
import queries.patching.patch, queries.core.run_model  # noqa: F401
print("ready", flush=True)
sys.stdin.readline()
r = CliRunner().invoke(main, ["patch", sys.argv[1], "--run", "1", "--component", "head",
                              "--format", "csv"])
print(r.exit_code)
print(r.stdout, end="")
sys.stderr.write(r.stderr)
"""


@pytest.mark.slow
def test_the_same_query_started_twice_at_once_is_recorded_once(ioi_copy):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    procs = [
        subprocess.Popen([sys.executable, "-c", ASK, str(ioi_copy)], stdin=subprocess.PIPE,
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
        for _ in range(2)
    ]  # fmt: skip
    for p in procs:
        assert p.stdout.readline().strip() == "ready"
    for p in procs:
        p.stdin.write("go\n")
        p.stdin.flush()
    outs = [p.communicate(timeout=300) for p in procs]
    codes = [out.splitlines()[0] for out, _ in outs]
    assert codes == ["0", "0"], outs
    rows = [out.splitlines()[1:] for out, _ in outs]
    assert rows[0] == rows[1] and len(rows[0]) > 10
    store = actstore.open(ioi_copy)
    assert store.sql("select count(*) from queries").item() == 1
    n_effects = store.sql("select count(*) from effects").item()
    assert n_effects == len(rows[0]) - 1  # the one query's rows, not twice
