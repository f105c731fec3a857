"""No command writes a file inside a store: every output path that resolves (symlinks followed)
into a store directory is refused in one line, exit 2, before any work and with nothing written,
so a mistyped `-o` can never overwrite the catalog, a chunk or an array's metadata."""

from __future__ import annotations

import pytest
from click.testing import CliRunner
from test_cli import snapshot

import actstore
from actstore.app.cli import main
from actstore.core.errors import UsageError

HOOK = "blocks.2.hook_resid_pre"


def _targets(store, outside):
    """Output paths that land inside the store, each named for the file it would overwrite."""
    zarr_json = store / "arrays.zarr" / "run1" / "clean" / HOOK / "zarr.json"
    chunk = next(p for p in (zarr_json.parent / "c").rglob("*") if p.is_file())
    (outside / "catalog-link.csv").symlink_to(store / "catalog.duckdb")
    (outside / "store-link").symlink_to(store, target_is_directory=True)
    return {
        "catalog": store / "catalog.duckdb",
        "root metadata": store / "arrays.zarr" / "zarr.json",
        "array metadata": zarr_json,
        "chunk": chunk,
        "new file in the store": store / "rows.csv",
        "the store itself": store,
        "symlink to the catalog": outside / "catalog-link.csv",
        "through a symlinked directory": outside / "store-link" / "catalog.duckdb",
    }


def _commands(store, target):
    """Every command that writes a file, aimed at `target`."""
    s, t = str(store), str(target)
    return {
        "export": ["export", s, "prompts", "-o", t],
        "export --sql": ["export", s, "--sql", "select 1 as x", "--format", "parquet", "-o", t],
        "report": ["report", s, "-o", t],
        "plot": ["plot", s, "effects", "1", "-o", t],
        "subspace --save-basis": ["subspace", s, "--run", "1", "--hook", HOOK, "--basis",
                                  "mean-diff", "--save-basis", t],
        "demo": ["demo", t],
    }  # fmt: skip


def test_no_command_writes_inside_a_store(ioi_copy, tmp_path):
    store = ioi_copy
    outside = tmp_path / "outside"
    outside.mkdir()
    targets = _targets(store, outside)
    before, around = snapshot(store), snapshot(outside)
    for what, target in targets.items():
        for command, args in _commands(store, target).items():
            res = CliRunner().invoke(main, args)
            assert res.exit_code == 2, (command, what, res.exit_code, res.output)
            lines = res.stderr.strip().splitlines()
            assert len(lines) == 1 and "is inside the store" in lines[0], (command, what, lines)
            assert str(store.resolve()) in lines[0] and "outside it" in lines[0]
            assert snapshot(store) == before, f"{command} onto the {what} changed the store"
    assert snapshot(outside) == around
    assert not list(store.rglob(".*partial*")) and not list(outside.rglob(".*partial*"))
    res = CliRunner().invoke(main, ["verify", str(store)])
    assert res.exit_code == 0 and "no damage" in res.stderr, res.output


def test_the_python_api_refuses_the_same_paths(ioi_copy, tmp_path):
    store = actstore.open(str(ioi_copy))
    before = snapshot(ioi_copy)
    with pytest.raises(UsageError, match="is inside the store"):
        store.export("prompts", out=str(ioi_copy / "catalog.duckdb"))
    with pytest.raises(UsageError, match="is inside the store"):
        store.report(str(ioi_copy / "arrays.zarr" / "zarr.json"))
    with pytest.raises(UsageError, match="is inside the store"):
        store.plot("effects", "1", str(ioi_copy / "p.png"))
    assert snapshot(ioi_copy) == before


def test_a_store_whose_catalog_is_gone_still_counts(ioi_copy, tmp_path):
    """The arrays of a store that lost its catalog are still its rows' only copy."""
    (ioi_copy / "catalog.duckdb").unlink()
    from actstore.core.location import store_containing

    assert store_containing(ioi_copy / "arrays.zarr" / "zarr.json") == ioi_copy.resolve()
    assert store_containing(tmp_path / "elsewhere.csv") is None


def test_outputs_beside_a_store_are_written(ioi_copy, tmp_path):
    """A sibling of the store is not inside it: the check refuses only what it must."""
    target = tmp_path / "prompts.csv"
    res = CliRunner().invoke(main, ["export", str(ioi_copy), "prompts", "-o", str(target)])
    assert res.exit_code == 0 and target.read_text().startswith("run_id,"), res.output
