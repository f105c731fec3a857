"""Files replaced whole (actstore/core/files.py): the one way actstore writes a file outside Zarr
and DuckDB leaves the old file or the new one, never half of one and never a partial file."""

from __future__ import annotations

import errno

import pytest

from actstore.core.errors import ActstoreError
from actstore.core.files import replace_file
from actstore.core.output import write_atomically


def test_a_failed_write_leaves_the_old_file_and_no_partial(tmp_path):
    target = tmp_path / "record.json"
    target.write_text("old")

    def write(tmp):
        tmp.write_text("half of the n")
        raise OSError(errno.ENOSPC, "No space left on device")

    with pytest.raises(OSError):
        replace_file(target, write)
    assert [p.name for p in tmp_path.iterdir()] == ["record.json"]
    assert target.read_text() == "old"


def test_sync_makes_the_partial_file_durable_before_the_rename_and_the_rename_after(tmp_path):
    target = tmp_path / "zarr.json"
    synced: list[tuple[str, str]] = []

    def sync(path):
        synced.append((path.name, path.read_text()))

    assert replace_file(target, lambda tmp: tmp.write_text("new"), sync=sync)
    (partial, before), after = synced
    assert partial.startswith(".zarr.json.") and partial.endswith(".partial") and before == "new"
    assert after == ("zarr.json", "new")
    assert [p.name for p in tmp_path.iterdir()] == ["zarr.json"]


def test_exclusive_writes_only_where_no_file_is(tmp_path):
    target = tmp_path / "arrays-location.json"
    assert replace_file(target, lambda tmp: tmp.write_text("first"), exclusive=True)
    assert not replace_file(target, lambda tmp: tmp.write_text("second"), exclusive=True)
    assert target.read_text() == "first"
    assert replace_file(target, lambda tmp: tmp.write_text("third"))
    assert target.read_text() == "third"
    assert [p.name for p in tmp_path.iterdir()] == ["arrays-location.json"]


def test_an_output_that_cannot_be_written_is_one_line(tmp_path):
    def write(tmp):
        raise OSError(errno.EACCES, "Permission denied")

    with pytest.raises(ActstoreError) as err:
        write_atomically(tmp_path / "rows.csv", write)
    assert str(err.value) == (
        f"cannot write {tmp_path / 'rows.csv'}: Permission denied; choose a writable path"
    )
    assert list(tmp_path.iterdir()) == []
