"""Tampered metadata is never read: the catalog records each array's `zarr.json` (shape, chunks,
dtype, codecs, fill value), every read checks the file against it, `verify` names a difference
and `verify --repair` writes the recorded document back, chunks untouched."""

from __future__ import annotations

import json

import numpy as np
import pytest
from click.testing import CliRunner
from older import as_version
from test_cli import snapshot
from test_verify import chunk_path, session_model  # noqa: F401 (a fixture)

import actstore
from actstore.app.cli import main
from actstore.core import arrays as zarrays
from actstore.core.errors import DamagedError
from actstore.core.store import Store

HOOK = "blocks.1.attn.hook_z"
RESID = "blocks.2.hook_resid_pre"


@pytest.fixture
def store(ioi_copy):
    return ioi_copy


def metadata_files(store):
    return sorted((store / "arrays.zarr" / "run1").glob("*/*/zarr.json"))


def edit(path, **fields) -> None:
    doc = json.loads(path.read_text())
    doc.update(fields)
    path.write_text(json.dumps(doc))


def cli(*args: str):
    return CliRunner().invoke(main, [*args])


def n_queries(store) -> int:
    return actstore.open(store).sql("select count(*) from queries").item()


def one_line(res, code: int, *words: str) -> str:
    """The one stderr line of a refused command (exit `code`, no traceback), holding `words`."""
    assert res.exit_code == code, (res.exit_code, res.output)
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1 and "Traceback" not in res.output, res.output
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def test_every_array_saying_fewer_prompts_is_refused_by_every_reader(store):
    """Every array's zarr.json edited to say 16 prompts instead of 20 (two whole chunks): no
    query and no `Store.read` returns 16 prompts of numbers; each refuses in one line naming
    the array and the repair, and records nothing."""
    scores = cli("attribute", str(store), "--run", "1", "--method", "eap", "--format", "csv")
    assert scores.exit_code == 0, scores.output
    before = n_queries(store)
    files = metadata_files(store)
    assert len(files) > 10
    for path in files:
        doc = json.loads(path.read_text())
        edit(path, shape=[16, *doc["shape"][1:]])
    with pytest.raises(DamagedError, match=r"run 1 clean .*zarr.json says shape \[16,"):
        actstore.open(store).read(1, "clean", HOOK)
    run = ["--run", "1", "--format", "csv"]
    commands = {
        "patch": ["patch", str(store), *run, "--component", "head", "--recompute"],
        "attribute": ["attribute", str(store), *run, "--method", "atp"],
        "subspace": ["subspace", str(store), *run, "--hook", RESID, "--basis", "mean-diff"],
        "reduce": ["reduce", str(store), *run, "--hook", HOOK],
        "circuit": ["circuit", str(store), "--scores", "1", "--edges", "5", "--format", "csv"],
    }
    for name, args in commands.items():
        line = one_line(cli(*args), 1, "zarr.json says shape [16,", "where the catalog "
                              "records [20,", "run actstore verify --repair")  # fmt: skip
        assert line.startswith("error: run 1 "), (name, line)
    assert n_queries(store) == before
    res = cli("verify", str(store), "--format", "csv")
    assert res.exit_code == 1 and res.stdout.count("says shape [16,") == len(files), res.output
    repaired = cli("verify", str(store), "--repair", "--format", "csv")
    assert repaired.exit_code == 0, repaired.output
    assert repaired.stdout.count("restored") == len(files)
    assert "no damage" in repaired.stderr
    assert actstore.open(store).read(1, "clean", HOOK).shape[0] == 20


def test_dtype_edited_is_refused_and_repair_restores_the_file_exactly(store):
    path = store / "arrays.zarr" / "run1" / "clean" / HOOK / "zarr.json"
    original, values = path.read_bytes(), actstore.open(store).read(1, "clean", HOOK)
    chunks = {k: v for k, v in snapshot(store).items() if "/c/" in k}
    edit(path, data_type="int32")
    with pytest.raises(DamagedError, match='says data_type "int32" where the catalog records'):
        actstore.open(store).read(1, "clean", HOOK)
    res = cli("patch", str(store), "--run", "1", "--component", "head", "--recompute")
    one_line(res, 1, f"run 1 clean {HOOK}: the array's metadata", "verify --repair")
    assert n_queries(store) == 0
    res = cli("verify", str(store), "--format", "csv")
    assert res.exit_code == 1 and res.stdout.count("data_type") == 1, res.output
    assert f"1,clean,{HOOK},,,,damaged," in res.stdout
    res = cli("verify", str(store), "--repair", "--format", "csv")
    assert res.exit_code == 0 and "restored" in res.stdout, res.output
    assert path.read_bytes() == original
    assert {k: v for k, v in snapshot(store).items() if "/c/" in k} == chunks
    assert np.array_equal(actstore.open(store).read(1, "clean", HOOK), values)


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("fill_value", 7.0),
        ("chunk_grid", {"name": "regular", "configuration": {"chunk_shape": [4, 19, 4, 16]}}),
        ("codecs", [{"name": "bytes", "configuration": {"endian": "big"}}]),
    ],
)
def test_any_field_a_read_relies_on_is_checked(store, field, value):
    """The fill value, the chunk grid and the codecs are checked like the shape and dtype."""
    path = store / "arrays.zarr" / "run1" / "clean" / HOOK / "zarr.json"
    edit(path, **{field: value})
    with pytest.raises(DamagedError, match=f"zarr.json says {field} .* where the catalog records"):
        actstore.open(store).read(1, "clean", HOOK)


def test_chunk_replaced_by_a_directory_is_damage_and_repaired(store):
    path = chunk_path(store, "clean", HOOK, 1)
    original = path.read_bytes()
    path.unlink()
    path.mkdir()
    (path / "x").write_text("not a chunk")
    with pytest.raises(DamagedError, match=f"run 1 clean {HOOK} chunk 1 .prompts 8..15. is"):
        actstore.open(store).read(1, "clean", HOOK)
    res = cli("verify", str(store), "--format", "csv")
    assert res.exit_code == 1 and f"1,clean,{HOOK},1,8,16," in res.stdout, res.output
    res = cli("verify", str(store), "--repair", "--format", "csv")
    assert res.exit_code == 0 and "repaired" in res.stdout, res.output
    assert path.is_file() and path.read_bytes() == original


@pytest.mark.parametrize("how", ["deleted", "text"])
def test_root_metadata_lost_or_garbage_stops_reads_and_is_restored(store, how):
    root = store / "arrays.zarr" / "zarr.json"
    original = root.read_bytes()
    if how == "deleted":
        root.unlink()
    else:
        root.write_text("this is not metadata\n")
    said = "is gone" if how == "deleted" else "is not JSON"
    with pytest.raises(DamagedError, match=f"arrays.zarr/zarr.json {said}"):
        actstore.open(store).read(1, "clean", HOOK)
    res = cli("patch", str(store), "--run", "1", "--component", "head")
    one_line(res, 1, "the arrays' root group metadata", said, "verify --repair")
    assert n_queries(store) == 0
    res = cli("verify", str(store), "--format", "csv")
    assert res.exit_code == 1 and "no damage" not in res.stderr, res.output
    assert f"(the arrays' root group) {said}" in res.stdout
    res = cli("verify", str(store), "--repair", "--format", "csv")
    assert res.exit_code == 0 and "restored" in res.stdout and "no damage" in res.stderr
    assert json.loads(root.read_bytes()) == json.loads(original)
    assert cli("patch", str(store), "--run", "1", "--component", "head").exit_code == 0


def older_catalog(store) -> None:
    """Make the store's catalog a version-4 one: no metadata documents recorded."""
    as_version(store, 4)


def test_an_older_catalog_checks_metadata_and_records_it_on_its_next_write(store):
    documents = actstore.open(store).sql("select hook, side, metadata from arrays order by all")
    older_catalog(store)
    path = store / "arrays.zarr" / "run1" / "corrupted" / HOOK / "zarr.json"
    doc = json.loads(path.read_text())
    edit(path, shape=[16, *doc["shape"][1:]])
    s = Store(store)
    with pytest.raises(DamagedError, match="says shape"):  # from the row's shape, chunks, dtype
        s.read(1, "corrupted", HOOK)
    with s.transaction():  # the next write migrates the catalog, under the writer
        pass
    recorded = s.sql("select hook, side, metadata from arrays order by all")
    assert recorded.equals(documents)  # from the rows, not from the edited file


def test_a_clean_store_records_the_document_zarr_wrote(store):
    s = actstore.open(store)
    row = s.sql(f"select * from arrays where side = 'clean' and hook = '{HOOK}'").to_dicts()[0]
    on_disk = (store / "arrays.zarr" / "run1" / "clean" / HOOK / "zarr.json").read_text()
    assert json.loads(row["metadata"]) == json.loads(on_disk)
    assert zarrays.expected_metadata({**row, "metadata": None}) == row["metadata"]
