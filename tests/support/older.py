"""A store's catalog as an older actstore wrote it: what each later schema version added, taken
away again, so that a test can check that such a catalog reads and migrates."""

from __future__ import annotations

from pathlib import Path

import duckdb

from actstore.core.catalog import SCHEMA_VERSION

# version -> statements that undo what the migration to that version added
UNDO: dict[int, list[str]] = {
    2: ["ALTER TABLE prompts DROP COLUMN answers", "ALTER TABLE prompts DROP COLUMN wrong_answers",
        "ALTER TABLE prompts DROP COLUMN answer_tokens",
        "ALTER TABLE prompts DROP COLUMN wrong_answer_tokens"],
    3: ["ALTER TABLE models DROP COLUMN architecture"],
    4: ["DROP TABLE prompt_roles"],
    5: ["ALTER TABLE arrays DROP COLUMN metadata"],
    6: ["DROP TABLE path_effects"],
    7: ["ALTER TABLE effects DROP COLUMN role"],
    8: ["DROP TABLE attention"],
    9: ["DROP TABLE head_scores"],
    10: ["DROP TABLE interventions"],
    11: ["ALTER TABLE prompts DROP COLUMN clean_token_texts"],
    12: ["ALTER TABLE subspace_reports RENAME COLUMN direction TO mode",
         "ALTER TABLE subspace_bases RENAME TO subspace_directions"],
}  # fmt: skip


def as_version(store: Path, version: int) -> None:
    """Make `store`'s catalog a schema-`version` one (its views are left to the migration)."""
    assert max(UNDO) == SCHEMA_VERSION, "a new migration: say in UNDO what it added"
    con = duckdb.connect(str(Path(store) / "catalog.duckdb"))
    try:
        for later in range(SCHEMA_VERSION, version, -1):
            for statement in UNDO[later]:
                con.execute(statement)
        con.execute("UPDATE meta SET value = ? WHERE key = 'schema_version'", [str(version)])
    finally:
        con.close()
