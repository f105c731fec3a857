"""The README's console blocks, run in order in a fresh directory: every command still does
what the README shows (exit status, ids, table columns, row counts). `make readme` regenerates
the blocks after a change to the CLI's output."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from readme_console import differences, parse, run

pytestmark = pytest.mark.slow

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_blocks_are_generated_and_parse():
    text = README.read_text()
    blocks = parse(text)
    assert [len(b) for b in blocks] == [16, 5, 5, 6, 3]
    assert text.count("[[[cog") == text.count("[[[end]]]") == len(blocks) + 1  # and the demo
    assert all(step.command.startswith("actstore ") for block in blocks for step in block)


@pytest.mark.timeout(600)
def test_readme_console_blocks_run_as_shown(tmp_path, monkeypatch):
    """The console blocks in order, then the Python API block, which continues their store."""
    text = README.read_text()
    problems = []
    for block in parse(text):
        for expected in block:
            problems += differences(expected, run(expected.command, tmp_path))
    assert not problems, "README out of date (run make readme):\n" + "\n".join(problems)
    (api,) = re.findall(r"^```python\n(.*?)^```", text, flags=re.M | re.S)
    monkeypatch.chdir(tmp_path)
    namespace: dict = {}
    exec(compile(api, "README.md (Python API)", "exec"), namespace)
    store = namespace["store"]
    assert store.runs()["task"].to_list() == ["ioi", "colored-objects", "greater-than", "sva"]
    assert namespace["z"].shape[0] == 32
