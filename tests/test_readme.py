"""The README's console blocks, run in order in a fresh directory: every command still does
what the README shows (exit status, ids, table columns, row counts). `make readme` regenerates
the blocks after a change to the CLI's output."""

from __future__ import annotations

from pathlib import Path

import pytest
from readme_console import differences, parse, run

README = Path(__file__).resolve().parents[1] / "README.md"


def test_readme_blocks_are_generated_and_parse():
    text = README.read_text()
    blocks = parse(text)
    assert len(blocks) == 2 and sum(len(b) for b in blocks) == 21
    assert text.count("[[[cog") == text.count("[[[end]]]") == len(blocks)
    assert all(step.command.startswith("actstore ") for block in blocks for step in block)


@pytest.mark.timeout(600)
def test_readme_console_blocks_run_as_shown(tmp_path):
    problems = []
    for block in parse(README.read_text()):
        for expected in block:
            problems += differences(expected, run(expected.command, tmp_path))
    assert not problems, "README out of date (run make readme):\n" + "\n".join(problems)
