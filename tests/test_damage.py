"""Damage is never read as data: every read of a run's arrays checks the chunks it touches against
the chunk ledger, and fails in one line naming run, side, hook, chunk and the fix. A repair
restores the data and invalidates the queries computed before it."""

from __future__ import annotations

import numpy as np
import pytest
from click.testing import CliRunner
from test_cli import snapshot
from test_verify import chunk_path, flip_byte

import actstore
from actstore.app.cli import main
from actstore.core.errors import DamagedError

HOOK = "blocks.1.attn.hook_z"
PATCH = ["--run", "1", "--component", "head", "--format", "csv"]


@pytest.fixture
def store(ioi_copy):
    return ioi_copy


@pytest.fixture(autouse=True)
def session_model(monkeypatch, toy_random):
    import ingest.repair

    monkeypatch.setattr(ingest.repair, "load_model", lambda spec, device=None: toy_random)


def damage(store, how: str) -> str:
    """Damage chunk 1 (prompts 8..15) of the clean side's HOOK (with chunk 0 when swapping);
    returns how the first damaged chunk a read meets is named."""
    path = chunk_path(store, "clean", HOOK, 1)
    where = f"run 1 clean {HOOK} chunk 1 (prompts 8..15)"
    if how == "deleted":
        path.unlink()
        return f"{where} is missing: chunk file arrays.zarr/run1/clean/{HOOK}/c/1/0/0/0 is gone"
    if how == "swapped":  # two valid chunks in each other's place: both decode
        other = chunk_path(store, "clean", HOOK, 0)
        a, b = path.read_bytes(), other.read_bytes()
        path.write_bytes(b)
        other.write_bytes(a)
        return (f"run 1 clean {HOOK} chunk 0 (prompts 0..7) is damaged: checksum of the "
                "decoded values differs from the ledger")  # fmt: skip
    if how == "truncated":  # a half Blosc chunk may still decode, to other values
        path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
        return f"{where} is damaged: "
    flip_byte(path)
    return f"{where} is damaged"


def patch(store, *extra: str):
    return CliRunner().invoke(main, ["patch", str(store), *PATCH, *extra])


def n_queries(store) -> int:
    return actstore.open(store).sql("select count(*) from queries").item()


@pytest.mark.parametrize("how", ["deleted", "swapped", "truncated", "flipped"])
def test_patch_over_a_damaged_chunk_fails_in_one_line_and_records_nothing(store, how):
    expected = damage(store, how)
    res = patch(store, "--recompute")
    assert res.exit_code == 1, res.output
    lines = res.stderr.strip().splitlines()
    assert len(lines) == 1, res.stderr
    assert lines[0].startswith(f"error: {expected}"), lines[0]
    if how == "truncated":  # named as undecodable, or by the checksum of what it decoded to
        assert ("chunk does not decode" in lines[0]) != ("checksum of the decoded" in lines[0])
    assert lines[0].endswith("; run actstore verify --repair")
    assert "Traceback" not in res.output
    assert n_queries(store) == 0


def test_every_read_checks_even_a_chunk_read_before(store):
    s = actstore.open(store)
    good = s.read(1, "clean", HOOK, 8, 12)
    flip_byte(chunk_path(store, "clean", HOOK, 1), at=0.7)
    with pytest.raises(DamagedError, match=f"run 1 clean {HOOK} chunk 1 .prompts 8..15. is"):
        s.read(1, "clean", HOOK, 9, 10)  # the same Store, a part of the same chunk
    assert s.read(1, "clean", HOOK, 0, 8).shape == (8, *good.shape[1:])  # chunk 0 is fine
    with pytest.raises(DamagedError, match="chunk 1"):
        s.array(1, "clean", HOOK)[:]


def test_a_reduction_through_dask_checks_its_chunks(store):
    damage(store, "swapped")
    res = CliRunner().invoke(main, ["reduce", str(store), "--run", "1", "--hook", HOOK])
    assert res.exit_code == 1 and "run actstore verify --repair" in res.stderr, res.output
    assert f"run 1 clean {HOOK} chunk" in res.stderr


def test_repair_restores_reads_and_invalidates_earlier_results(store):
    first = patch(store)
    assert first.exit_code == 0, first.output
    attribute = CliRunner().invoke(main, ["attribute", str(store), "--run", "1", "--method",
                                          "eap", "--format", "csv"])  # fmt: skip
    assert attribute.exit_code == 0, attribute.output
    assert n_queries(store) == 2
    damage(store, "flipped")
    res = CliRunner().invoke(main, ["verify", str(store), "--repair", "--format", "csv"])
    assert res.exit_code == 0, res.output
    assert "invalidated" in res.stdout and "deleted its 2 recorded queries" in res.stdout
    s = actstore.open(store)
    for table, column in [("queries", "query_id"), ("effects", "query_id"),
                          ("edge_scores", "score_id")]:  # fmt: skip
        assert s.sql(f"select count({column}) from {table}").item() == 0, table
    again = patch(store)  # computed afresh from the repaired chunk, same numbers as before
    assert again.exit_code == 0, again.output
    before = [line.split(",")[1:] for line in first.stdout.splitlines()[1:]]
    after = [line.split(",")[1:] for line in again.stdout.splitlines()[1:]]
    assert before == after and again.stdout.splitlines()[1].startswith("3,")


def test_lost_metadata_is_named_by_verify_and_restored_by_repair(store):
    s = actstore.open(store)
    original = s.read(1, "corrupted", HOOK)
    (store / "arrays.zarr" / "run1" / "corrupted" / HOOK / "zarr.json").unlink()
    chunks = {k: v for k, v in snapshot(store).items() if "/c/" in k}
    with pytest.raises(DamagedError, match=f"run 1 corrupted {HOOK}: the array .* cannot be"):
        actstore.open(store).read(1, "corrupted", HOOK)
    assert np.array_equal(actstore.open(store).read(1, "clean", HOOK), s.read(1, "clean", HOOK))
    res = patch(store, "--recompute")
    assert res.exit_code == 1 and len(res.stderr.strip().splitlines()) == 1, res.output
    assert f"run 1 corrupted {HOOK}: the array" in res.stderr and "verify --repair" in res.stderr
    (store / "arrays.zarr" / "zarr.json").unlink()  # reads stop at it (tests/test_metadata.py)
    res = CliRunner().invoke(main, ["verify", str(store), "--format", "csv"])
    assert res.exit_code == 1 and "Traceback" not in res.output
    assert "arrays.zarr/zarr.json (the arrays' root group) is gone" in res.stdout
    assert res.stdout.count(f"corrupted,{HOOK},") == 3  # its three chunks cannot be read
    res = CliRunner().invoke(main, ["verify", str(store), "--repair", "--format", "csv"])
    assert res.exit_code == 0, res.output
    assert res.stdout.count("restored") == 2 and "no damage" in res.stderr
    assert {k: v for k, v in snapshot(store).items() if "/c/" in k} == chunks  # none rewritten
    assert np.array_equal(actstore.open(store).read(1, "corrupted", HOOK), original)


def test_repair_removes_temporary_files_of_killed_writers(store):
    leftover = chunk_path(store, "clean", HOOK, 0).with_name("0.0123abcd.partial")
    leftover.write_bytes(b"half a chunk")
    res = CliRunner().invoke(main, ["verify", str(store), "--repair", "--format", "csv"])
    assert res.exit_code == 0, res.output
    assert "removed" in res.stdout and not leftover.exists()
